"""Head training benchmark (issue 3): throughput and 8-epoch wall time from cache,
the cost of one head step against one end-to-end step (text encoder forward +
backward + head, as CAMIM's code trains) on the same batch, the same step in the
precision the trainer picks (bf16 autocast where the hardware runs it natively)
against the other one, and on 1 thread against every core.

Uses ``--source``/``MNRE_SOURCE`` (full MNRE: ``../shared/data/mnre``), the profile's
``[train]`` options and ``BENCH_MLLM`` (default ``imported:qwen``); ``BENCH_EPOCHS``
(default 8) and ``BENCH_STEPS`` (default 10 timed steps per side of the ratio).
Numbers on a shared CPU are noisy: read the ratio, and rerun on a quiet machine.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from bench._common import OthersLoad, bf16_skip_text, bf16_slow, cpu_name, roofline, roofline_text


def _timed_steps(fn, n: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def top_flops(data, dims: dict, joint: bool | str) -> dict[str, float]:
    """FLOPs of one epoch of the tuned top: training over the train split (forward + backward;
    the first layer needs no input gradient) and the forward over val, from the real piece counts
    (with captions read jointly, each sample is sentence + caption pieces).  Memory reading
    (``joint = "memory"``): the sentence's layers attend over sentence + caption keys, the caption
    costs its K and V projections (forward and weight gradient), and ``once`` is the frozen top's
    forward over every caption, computed once per run."""
    d, f, k = int(dims["sent_word"]), int(dims["top_ffn"]), int(dims["top_layers"])
    lin = 2 * (4 * d * d + 2 * d * f)  # per piece per layer, forward: q k v o + the two FFN matrices

    def lens(split, what):
        rows = data.splits[split] if split else torch.arange(what.off.shape[0] - 1)
        return (what.off[rows + 1] - what.off[rows]).double()

    def sequences(split):  # piece counts of every sequence the tuned layers read
        s = lens(split, data.sent)
        if "cap_word" not in dims:
            return [s]
        c = lens(split, data.cap)
        return [s + c] if joint else [s, c]

    def fwd(split):  # one forward of every tuned layer over the split: linear layers + QK^T and AV
        return k * sum(float((lin * n + 4 * d * n * n).sum()) for n in sequences(split))

    if joint == "memory" and "cap_word" in dims:
        def parts(split):  # (sentence queries over sentence + caption keys, the caption's K and V) x k layers
            s, c = lens(split, data.sent), lens(split, data.cap)
            return k * float((lin * s + 4 * d * s * (s + c)).sum()), k * float((4 * d * d * c).sum())

        (ts, tkv), (vs, vkv) = parts("train"), parts("val") if "val" in data.splits else (0.0, 0.0)
        c = lens(None, data.cap)
        return {"train": ts * (3 * k - 1) / k + 2 * tkv, "val": vs + vkv,
                "once": k * float((lin * c + 4 * d * c * c).sum())}
    train = fwd("train") * (3 * k - 1) / k  # backward = 2x forward, less the input gradient of the first layer
    return {"train": train, "val": fwd("val") if "val" in data.splits else 0.0}


def trainer_head(data, conf: dict, device):
    """The head as the trainer builds it (started from the cached top layers, memory reading's caption
    states prepared) and an AdamW over it."""
    from stages.train import HEADS
    from stages.train.trainer import adamw, param_groups

    head = HEADS.get(conf["head"])(data.dims, len(data.labels), dict(conf))
    if hasattr(head, "load_pretrained") and data.pretrained:
        head.load_pretrained(data.pretrained)
    head = head.to(device)
    if hasattr(head, "prepare_data"):
        head.prepare_data(data)
    return head, adamw(param_groups(head, 0.01, 1e-3), 1e-3, device)


def train_step(head, opt, batch: dict, amp, device) -> None:
    """One optimiser step of ``head`` on ``batch``, in the precision ``amp`` (None: fp32), as the trainer takes it."""
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = head(batch)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _settings_from_env():
    from pipeline.config import Settings, default_cache_dir

    return Settings(profile=os.environ.get("PROFILE", "offline"), cache_dir=os.environ.get("CACHE_DIR") or default_cache_dir(),
                    task=os.environ.get("TASK", "mnre"), source=os.environ.get("MNRE_SOURCE") or None,
                    device=os.environ.get("DEVICE", "auto"))


def main(settings=None, argv: list[str] | None = None) -> int:
    """``main(settings)``, or ``main([])`` / ``main()``: settings from PROFILE, CACHE_DIR, MNRE_SOURCE, TASK, DEVICE."""
    from pipeline.config import Settings

    if not isinstance(settings, Settings):
        settings = _settings_from_env()
    from stages.features import text_stage
    from stages.features.text import mark_tokens
    from stages.train import HEADS
    from stages.train.trainer import (
        adamw,
        amp_dtype,
        pick_device,
        train_one,
        train_options,
    )

    mllm = os.environ.get("BENCH_MLLM", "imported:qwen")
    epochs = int(os.environ.get("BENCH_EPOCHS", "8"))
    steps = int(os.environ.get("BENCH_STEPS", "10"))
    conf = train_options(settings, {"epochs": epochs})
    if int(conf["threads"]) > 0:
        torch.set_num_threads(int(conf["threads"]))
    from camim.graph import inputs_for
    from stages.train.trainer import load_data

    t0 = time.perf_counter()
    data = load_data(settings, mllm, conf["head"], inputs_for(settings, mllm))
    load_s = time.perf_counter() - t0
    cached_memory = getattr(data, "cap_levels", None) is not None  # text.memory: no once-a-run caption pass
    n_train = len(data.splits["train"])
    print(f"train bench: {len(data.records)} records ({n_train} train) of {settings.source or 'the bundled sample'}, "
          f"caption source {mllm}; features gathered from the cache in {load_s:.1f}s; torch threads {torch.get_num_threads()}")
    others = OthersLoad()
    print(others.quiet())
    roof = roofline(3)
    print(f"cpu: {cpu_name()}; roofline measured now "
          f"({torch.get_num_threads()} threads): {roofline_text(roof)}")

    # 1. the real trainer, `epochs` epochs, into a throw-away runs folder
    from dataclasses import replace

    with tempfile.TemporaryDirectory() as tmp:
        res = train_one(replace(settings, runs_dir=tmp), mllm, int(conf["seeds"][0]), {"epochs": epochs}, data=data,
                        run_id="bench", force=True, quiet=True)
    m = res.metrics
    top = data.dims.get("top_layers", 0)
    how = f" (joint={conf.get('joint', True)}, top_lr={conf['top_lr']})" if top else " (frozen text)"
    print(f"head: {conf['head']}, tuned top layers {top}" + how
          + f"; cpu: {cpu_name()}")
    print(f"head training: {m['train_samples_per_s']:.0f} samples/s ({m['amp']} on {m['device']}); "
          f"{epochs} epochs wall {m['wall_s']:.1f}s incl. per-epoch validation "
          f"(test F1 {m['test']['f1'] * 100:.2f})")
    if epochs != 8:
        per_epoch = statistics.fmean(h["seconds"] for h in m["history"])
        once = m["wall_s"] - sum(h["seconds"] for h in m["history"])  # test scoring, memory reading's caption pass
        print(f"8 epochs (estimated from {epochs} measured): {8 * per_epoch + once:.0f}s incl. validation and "
              f"{once:.0f}s of once-a-run work ({8 * n_train / m['train_samples_per_s']:.0f}s of it training)")

    if top:  # the floor this CPU puts under the tuned top: its FLOPs at the roofline measured above
        fl = top_flops(data, data.dims, conf.get("joint", True))
        peak = roof["bf16" if m["amp"] == "bfloat16" else "fp32"]
        per_epoch = (fl["train"] + fl["val"]) / (peak * 1e9)
        once = 0.0 if cached_memory else fl.get("once", 0.0) / (peak * 1e9)
        spent = statistics.fmean(h["seconds"] for h in m["history"])
        if cached_memory and "once" in fl:
            extra = " (memory reading's caption states come from the cache: no once-a-run pass)"
        else:
            extra = f" + {fl['once'] / 1e12:.1f} TFLOP once a run (memory reading's frozen caption states)" if once else ""
        print(f"roofline floor: the tuned top alone is {(fl['train'] + fl['val']) / 1e12:.1f} TFLOP an epoch "
              f"(train fwd+bwd and val fwd){extra} -> 8 epochs take at least {8 * per_epoch + once:.0f}s at {peak:.0f} GFLOP/s; "
              f"the measured epoch ran at {per_epoch / spent:.0%} of that roofline")

    # 2. one head step vs one end-to-end step (every encoder layer fwd+bwd + head) on the same batch
    device = pick_device(settings.device)
    amp = amp_dtype(str(conf["amp"]), device)
    bs = int(conf["batch_size"])
    rows = data.splits["train"][:bs]
    head, opt = trainer_head(data, conf, device)
    batch = {k: v.to(device) for k, v in data.batch(rows).items()}

    def head_step(amp=amp):
        train_step(head, opt, batch, amp, device)

    stage = text_stage(settings)
    stage.setup()
    enc = stage.model.float().train()
    recs = [data.records[i] for i in rows.tolist()]
    words = [mark_tokens(r["tokens"], (r["h_start"], r["h_end"]), (r["t_start"], r["t_end"]), stage.conf["markers"])[0] for r in recs]
    tok = stage.tok(words, is_split_into_words=True, truncation=True, max_length=stage.conf["max_len"], padding=True, return_tensors="pt")
    tok = {k: v.to(device) for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    cap_tok = None
    if "cap_word" in batch:  # the captions go through the encoder too
        from camim import chain

        _, caps = chain.captions(settings, [mllm])
        texts = [caps[0].for_record(r) or "" for r in recs]
        cap_tok = stage.tok(texts, truncation=True, max_length=stage.conf["caption_max_len"], padding=True, return_tensors="pt")
        cap_tok = {k: v.to(device) for k, v in cap_tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    # End-to-end is what the tuned top replaces: every encoder layer forward and backward over the sentence and the
    # caption, and the same head reading the encoder's last layer (its own tuned top off, nothing computed twice).
    e2e_head = HEADS.get(conf["head"])(data.dims, len(data.labels), {**conf, "tune_top": False}).to(device)
    enc_opt = adamw([{"params": list(enc.parameters()) + list(e2e_head.parameters())}], 1e-5, device)

    def put(b, name, h):
        n = min(h.shape[1], b[name].shape[1])
        b[name] = torch.zeros_like(b[name], dtype=h.dtype)
        b[name][:, :n] = h[:, :n, : b[name].shape[-1]]

    def e2e_step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            b = {k: v for k, v in batch.items() if k != "cap_levels"}
            put(b, "sent_word", enc(**tok).last_hidden_state)
            if cap_tok is not None:
                put(b, "cap_word", enc(**cap_tok).last_hidden_state)
            loss = e2e_head(b)["loss"]
        enc_opt.zero_grad(set_to_none=True)
        loss.backward()
        enc_opt.step()

    th = statistics.median(_timed_steps(head_step, steps))
    te = statistics.median(_timed_steps(e2e_step, max(3, steps // 2)))
    what = f"tuned-top step ({top} layers)" if top else "head step"
    print(f"one step, batch {bs}: {what} {th * 1000:.1f} ms, end-to-end with every layer of {stage.conf['model']} fwd+bwd "
          f"{te * 1000:.1f} ms -> {what} = {th / te:.3f} of an end-to-end step ({te / th:.1f}x cheaper)")
    # 3. precision: the trainer's pick (``train.amp``) against the other one, on the same batch
    other = None if amp is not None else torch.bfloat16
    name = {None: "fp32", torch.bfloat16: "bf16 autocast"}
    if other is torch.bfloat16 and bf16_slow(roof):  # no native bf16: one step would take minutes
        print(f"precision: {what} in fp32 (the trainer's pick) {th * 1000:.1f} ms; bf16 not timed: {bf16_skip_text(roof)}")
    else:
        t_other = statistics.median(_timed_steps(lambda: head_step(other), steps))
        print(f"precision: {what} in {name[amp]} (the trainer's pick) {th * 1000:.1f} ms, in {name[other]} "
              f"{t_other * 1000:.1f} ms -> the pick is {t_other / th:.2f}x the speed of the other")
    # 4. threads: the same step on 1 thread and on every core (the profile's `threads` picks)
    before = torch.get_num_threads()
    per = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        per[n] = statistics.median(_timed_steps(head_step, steps))
    torch.set_num_threads(before)
    print("threads: " + ", ".join(f"{n}: {t * 1000:.1f} ms" for n, t in per.items())
          + (f" -> {per[1] / per[max(per)]:.2f}x faster on {max(per)}" if len(per) > 1 else ""))
    print(f"{others.summary()}; on a shared CPU read the ratios, not the absolute times")
    return 0
