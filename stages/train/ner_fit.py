"""A small fit loop for NER heads over ``NerData`` (the quality experiments of the
VEC-MNER head; ``camim train`` uses the shared trainer).  AdamW with linear warmup and
decay, gradient clipping, best epoch by val entity F1, test scored at that epoch only;
the head's ``fast_params()`` (if any) get ``fast_lr``.
"""

from __future__ import annotations

import logging
import time

import torch

from .ner import ner_metrics

log = logging.getLogger("camim")


def _to(b: dict, device) -> dict:
    return {k: v.to(device) for k, v in b.items()}


def evaluate(head, data, split: str, device="cpu", bs: int = 256) -> dict:
    head.eval()
    rows = data.splits[split]
    # similar lengths together: less padding
    rows = rows[torch.argsort(torch.tensor([len(data.records[i]["tokens"]) for i in rows.tolist()]))]
    preds: dict[int, list[int]] = {}
    with torch.inference_mode():
        for s in range(0, len(rows), bs):
            b = _to(data.batch(rows[s : s + bs]), device)
            b.pop("label")
            for i, p in zip(b["index"].tolist(), data.decode(b, head.predict(b).cpu())):
                preds[i] = p
    order = data.splits[split].tolist()
    return ner_metrics(data.gold(split), [preds[i] for i in order], data.labels)


def fit(head_cls, data, options: dict, epochs: int = 10, lr: float = 1e-3, fast_lr: float = 1e-2,
        batch_size: int = 32, weight_decay: float = 1e-2, warmup: float = 0.1, seed: int = 1234, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = head_cls(data.dims, len(data.labels), options).to(device)
    fast = {id(p) for p in (head.fast_params() if hasattr(head, "fast_params") else [])}
    body = [p for p in head.parameters() if p.requires_grad and id(p) not in fast]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": [p for p in head.parameters() if id(p) in fast], "lr": fast_lr}],
                            weight_decay=weight_decay)
    train = data.splits["train"]
    per = (len(train) + batch_size - 1) // batch_size
    total, wu = epochs * per, max(1, int(warmup * epochs * per))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / wu, max(0.0, (total - s) / max(1, total - wu))))
    best, state, history = None, None, []
    for ep in range(1, epochs + 1):
        head.train()
        t0, tot = time.perf_counter(), 0.0
        perm = train[torch.randperm(len(train), generator=gen)]
        for s in range(0, len(perm), batch_size):
            loss = head(_to(data.batch(perm[s : s + batch_size]), device))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach())
        val = evaluate(head, data, "val", device)
        history.append({"epoch": ep, "loss": tot / per, "val_f1": val["f1"], "seconds": time.perf_counter() - t0})
        log.info("epoch %d: loss %.4f val F1 %.2f (%.0fs)", ep, tot / per, 100 * val["f1"], time.perf_counter() - t0)
        if best is None or val["f1"] > best["val"]["f1"]:
            best = {"epoch": ep, "val": val}
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(state)
    return {"best_epoch": best["epoch"], "val": best["val"], "test": evaluate(head, data, "test", device),
            "history": history, "options": options, "head": head}
