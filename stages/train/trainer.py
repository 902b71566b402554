"""The head trainer: cached features in, ``runs/<run-id>/`` out. Never runs an encoder.

AdamW (weight decay on matrices only: none on biases and LayerNorm), linear warm-up
over ``warmup`` (10%) of the steps then linear decay to 0, batch 32, seeded.  The
epoch with the best validation micro-F1 is kept (strictly better, as CAMIM) and
scored on val and test.  With ``ema`` > 0, an exponential moving average of the trained
weights is what each epoch's validation scores and what the run keeps.  bf16 autocast on
CUDA and on CPUs with native bf16 (AMX / AVX512-BF16); parameters and the optimiser stay fp32.

A run folder holds ``config.json`` (settings, options, every cache key),
``metrics.json`` (fractions; per-epoch history; modalities present),
``predictions.parquet`` (split, sample, gold, prediction) and ``model.safetensors``
(the selected epoch).  A run whose folder already holds the same config and a
``metrics.json`` is not trained again (``force=True`` retrains).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.hashing import key_of
from pipeline.memory import peak_memory, reset_peak
from pipeline.store import atomic_write_json, atomic_write_table

from . import DATASETS, HEADS
from .metrics import metric_fn

log = logging.getLogger("camim")

DEFAULTS = {
    "head": "cam",
    "epochs": 8,
    "batch_size": 32,
    "eval_batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "amp": "auto",
    "seeds": [1, 2, 3],
    "threads": 0,
    "bucket": 50,
    "ema": 0.0,           # decay of an exponential moving average of the weights (0 = off): :class:`WeightAverage`
    "ema_warmup": 10,     # w of its warm-up cap (1 + n) / (w + n): the lower, the longer the average's memory
    "log": "jsonl",       # training curves: jsonl (runs/<id>/curves.jsonl) and/or tensorboard
    "log_every": 20,      # steps between logged losses
}
# options added after runs were measured: at their DEFAULTS value they stay out of the run key, so those runs keep theirs
KEYLESS_DEFAULTS = ("ema_warmup",)
# keys of [train] that are trainer settings, not head options
TRAINER_KEYS = set(DEFAULTS) | {"streams"}


def train_options(settings: Settings, overrides: dict | None = None) -> dict:
    """Trainer defaults < the profile's ``[train]`` < overrides (``--opt``, ``--epochs``, ``--head``).
    An override that neither the trainer nor the chosen head knows is an error naming the known ones
    (the profile may hold options of other heads; those are not checked)."""
    conf = {**DEFAULTS, **settings.section("train"), **(overrides or {})}
    every = set(DEFAULTS) | {"streams"} | {k for name in HEADS.names() for k in (getattr(HEADS.get(name), "OPTIONS", None) or {})}
    typo = sorted(set(settings.section("train")) - every)
    if typo:  # the profile may hold options of any head, but not of none
        raise PipelineError(f"[train] unknown setting(s): {', '.join(typo)} (known: trainer {', '.join(DEFAULTS)}, or an option of a head "
                            f"in {', '.join(HEADS.names())})")
    head_cls = HEADS.get(str(conf["head"]))
    known = set(DEFAULTS) | {"streams"} | set(getattr(head_cls, "OPTIONS", {}) or {})
    if getattr(head_cls, "OPTIONS", None) is not None:
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise PipelineError(f"unknown option(s) {', '.join(map(repr, unknown))} for head {conf['head']!r}; "
                                f"known: {', '.join(sorted(known))}")
    check_types(conf, {**DEFAULTS, **(getattr(head_cls, "OPTIONS", None) or {})}, set(overrides or {}))
    return conf


# values an option takes beside those of its default's type (checked where the option is read)
ALSO = {"joint": ("memory",)}


def check_types(conf: dict, defaults: dict, from_command_line: set) -> None:
    """Each option of ``conf`` that has a default of type bool, int, float or str holds a value of that
    type (an int where a float is expected is fine), or is an error naming where it came from: a word
    such as ``top_lr=abc`` would otherwise fail deep in training, and ``cap_ens=False`` (TOML spells it
    ``false``) would read as the string "False", which is true."""
    for k, d in defaults.items():
        v = conf.get(k)
        if v is None or d is None or v in ALSO.get(k, ()):
            continue
        if isinstance(d, bool):
            ok, kind = isinstance(v, bool), "true or false (lower case)"
        elif isinstance(d, int):
            ok, kind = isinstance(v, int) and not isinstance(v, bool), "a whole number"
        elif isinstance(d, float):
            ok, kind = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        elif isinstance(d, str):
            ok, kind = isinstance(v, str), "a word"
        else:
            continue
        if not ok:
            where = f"--opt {k}" if k in from_command_line else f"[train] {k}"
            also = "".join(f" or {a!r}" for a in ALSO.get(k, ()))
            raise PipelineError(f"{where} = {v!r}: expected {kind}{also}, like its default {str(d).lower() if isinstance(d, bool) else repr(d)}")


def parse_opts(pairs: list[str]) -> dict:
    """``["lr=3e-4", "align=S"]`` → ``{"lr": 0.0003, "align": "S"}`` (TOML values; bare words are strings)."""
    import tomllib

    out = {}
    for pair in pairs or []:
        k, eq, v = pair.partition("=")
        if not eq or not k.strip():
            raise PipelineError(f"--opt {pair!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def pick_device(device: str) -> torch.device:
    from stages.encoders import pick_device as _pick

    return torch.device(_pick(device))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively; ``amp = "off"`` disables autocast."""
    if amp == "off":
        return None
    if amp not in ("auto", "bf16"):
        raise PipelineError(f"train.amp must be auto, bf16 or off, not {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if amp == "bf16":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay on matrices only.  A head may give parameters their own learning rate:
    ``fast_params()`` with ``fast_lr_scale`` (e.g. VEC-MNER's CRF and emission layer learn
    10x faster) or ``lr_scales(lr) -> [(params, scale)]`` (e.g. a tuned top at ``top_lr``)."""
    scales: dict[int, float] = {}
    for p in model.fast_params() if hasattr(model, "fast_params") else []:
        scales[id(p)] = float(getattr(model, "fast_lr_scale", 1.0))
    if hasattr(model, "lr_scales") and lr:
        for ps, sc in model.lr_scales(lr):
            scales.update({id(p): float(sc) for p in ps})
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((p.ndim < 2 or name.endswith(".bias"), scales.get(id(p), 1.0)), []).append(p)
    out = []
    for (nd, sc), ps in sorted(groups.items()):
        g = {"params": ps, "weight_decay": 0.0 if nd else weight_decay}
        if sc != 1.0 and lr is not None:
            g["lr"] = lr * sc
        out.append(g)
    return out


def adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU and CUDA): one pass over every parameter
    instead of a dozen; on the tuned top's 3.5M parameters a step costs about 5x less."""
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cpu", "cuda"))


def linear_schedule(opt, total: int, warmup_frac: float):
    warm = max(1, int(round(total * warmup_frac))) if warmup_frac > 0 else 0

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def load_data(settings: Settings, mllm: str, head_name: str, inputs: dict):
    """The head's training data from ``inputs``: the resolved upstream outputs of one caption source
    (``camim.graph.train_inputs``); the trainer never runs an upstream stage itself."""
    from stages.data import get_task

    head_cls = HEADS.get(head_name)
    kind = getattr(head_cls, "dataset", None) or getattr(get_task(settings), "kind", "re")
    return DATASETS.get(kind)(settings, mllm, inputs)


class WeightAverage:
    """An exponential moving average of the trainable parameters, updated after each optimiser step
    with decay ``min(decay, (1 + n) / (w + n))`` at update ``n``, ``w`` = ``warmup`` (10: the average tracks
    closely at the start, as tf.train.ExponentialMovingAverage with ``num_updates``).  :meth:`swapped` puts the
    average into the model for validation and for keeping, then the trained weights back; buffers
    stay the model's.  The selected epoch is scored on weights averaged over its last few hundred
    steps, not on one step's, which damps the step-to-step noise that epoch selection would read.

    The cap ``(1 + n) / (w + n)`` stays below ``decay`` until update :attr:`binds_at` (1,790 at 0.995, w 10).
    Before it the average weights update ``k`` of ``N`` about as ``(k / N)^(w - 2)`` (polynomial-decay
    averaging): centred about ``N / w`` steps back.  A run shorter than that never reaches ``decay``, so any
    decay at or above the last cap gives the same run (:meth:`note`)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: float = 10):
        if not 0.0 < decay < 1.0:
            raise PipelineError(f"train.ema must be 0 (off) or a decay between 0 and 1, not {decay}")
        if not warmup >= 1.0:
            raise PipelineError(f"train.ema_warmup must be at least 1 (the cap (1 + n) / (w + n) must stay at most 1), not {warmup}")
        self.decay, self.w, self.n = decay, float(warmup), 0
        # first update whose cap reaches the decay: (1 + n) / (w + n) >= decay; the closed form, then float-safe
        n = max(0, math.ceil((self.w * decay - 1) / (1 - decay)) - 1)
        while (1 + n) / (self.w + n) < decay:
            n += 1
        self.binds_at = n
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - min(self.decay, (1 + self.n) / (self.w + self.n)))

    @contextmanager
    def swapped(self):
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    def note(self, total: int) -> str | None:
        """What a user who set ``decay`` should know when a run of ``total`` updates never reaches it."""
        if total >= self.binds_at:
            return None
        cap = math.ceil((1 + total) / (self.w + total) * 1e4) / 1e4  # rounded up: every decay from it on
        return (f"ema {self.decay:g}: the warm-up cap (1 + n) / ({self.w:g} + n) stays below it until update "
                f"{self.binds_at:,}, later than this run's {total:,} updates; so the average is that warm-up "
                f"throughout (centred about {int(total // self.w):,} updates back at the end), and any ema from "
                f"{cap:.4f} up gives this same run")

    def state_dict(self) -> dict:
        return {"n": self.n, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, list(state["shadow"]))


@dataclass
class RunResult:
    run_id: str
    dir: Path
    metrics: dict
    config: dict
    reused: bool = False


def epoch_batches(rows: torch.Tensor, lengths: torch.Tensor, bs: int, bucket: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches; with ``bucket`` > 0, each run of ``bucket`` batches is sorted by
    length first (less padding), and the batch order is shuffled again."""
    perm = rows[torch.randperm(len(rows), generator=gen)]
    if bucket <= 0:
        return list(perm.split(bs))
    out = []
    for chunk in perm.split(bs * bucket):
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        out.extend(chunk.split(bs))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model, data, split: str, conf: dict, device, amp, metrics) -> tuple[dict, list[int]]:
    model.eval()
    rows = data.splits[split]
    order = torch.argsort(data.lengths[rows], stable=True)  # length-sorted batches: little padding
    preds: list = [None] * len(rows)
    ebs = int(conf["eval_batch_size"])
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for i in range(0, len(rows), ebs):
            pos = order[i : i + ebs]
            b = _to(data.batch(rows[pos]), device)
            b.pop("label")
            p = model.predict(b)
            # a dataset may turn raw predictions into per-sample labels (e.g. NER spans)
            for j, v in zip(pos.tolist(), data.decode(b, p) if hasattr(data, "decode") else p.tolist()):
                preds[j] = v
    return metrics(data.gold(split), preds, data.labels), preds


def fresh_progress() -> dict:
    """Where a run without a checkpoint starts."""
    return {"epoch": 0, "best_f1": -1.0, "best_epoch": -1, "best_state": None, "history": [], "n_seen": 0, "train_seconds": 0.0}


def save_checkpoint(path: Path, model, opt, sched, gen: torch.Generator, progress: dict, ema: WeightAverage | None = None) -> None:
    """Everything needed to continue after the epoch just finished, written atomically."""
    doc = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
           "torch_rng": torch.get_rng_state(), "py_rng": list(random.getstate()[1]), "py_rng_pos": random.getstate()[2],
           **progress}
    if ema is not None:
        doc["ema"] = ema.state_dict()
    if torch.cuda.is_available():
        doc["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(doc, tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"cannot write the training checkpoint {path}: {exc.strerror or exc}") from None
    hook = os.environ.get("CAMIM_TEST_KILL_AFTER_EPOCH")  # tests: a real SIGKILL right after a checkpoint
    if hook and int(hook) == progress["epoch"]:
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(path: Path, model, opt, sched, gen: torch.Generator, ema: WeightAverage | None = None) -> dict:
    try:
        doc = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: start over rather than die
        log.warning("train: checkpoint %s unreadable (%s); starting from epoch 1", path, exc)
        path.unlink(missing_ok=True)
        return fresh_progress()
    model.load_state_dict(doc["model"])
    opt.load_state_dict(doc["opt"])
    sched.load_state_dict(doc["sched"])
    gen.set_state(doc["gen"])
    if ema is not None:
        ema.load_state_dict(doc["ema"])
    torch.set_rng_state(doc["torch_rng"])
    random.setstate((3, tuple(doc["py_rng"]), doc["py_rng_pos"]))
    if "cuda_rng" in doc and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(doc["cuda_rng"])
    return {k: doc[k] for k in ("epoch", "best_f1", "best_epoch", "best_state", "history", "n_seen", "train_seconds")}


#: Bumped when a change of the training code changes what a run computes under the same options
#: (2: the tuned top's own dropout masks and attention, ``tuned_top.dropout``); part of every run's
#: key, so a run trained by older code is never reused as if it were this code's.
RUN_VERSION = 2


def cpu_threads(settings: Settings, conf: dict) -> int | None:
    """The CPU threads a run trains on: ``threads``, or with 0 every thread torch would use now; None off the CPU.
    The count changes a run's floats (the order of its parallel sums), so it is part of the run's key."""
    if pick_device(settings.device).type != "cpu":
        return None
    return int(conf["threads"]) if int(conf["threads"]) > 0 else torch.get_num_threads()


def run_config(settings: Settings, data, mllm: str, seed: int, conf: dict) -> dict:
    # one thread stays out of the key: the runs measured before it held the count were trained on one
    threads = cpu_threads(settings, conf)
    return {
        "version": RUN_VERSION,
        **({"threads": threads} if threads not in (None, 1) else {}),
        "task": settings.task,
        "head": conf["head"],
        "mllm": mllm,
        "seed": seed,
        "options": {k: v for k, v in sorted(conf.items()) if k not in ("seeds", "eval_batch_size", "threads", "log", "log_every")
                    and not (k in KEYLESS_DEFAULTS and v == DEFAULTS[k])},
        "cache_keys": data.cache_keys,
        "models": getattr(data, "models", {}),
        "labels": data.labels,
        "dims": data.dims,
    }


def train_one(settings: Settings, mllm: str, seed: int, overrides: dict | None = None, data=None,
              run_id: str | None = None, force: bool = False, quiet: bool = False, inputs: dict | None = None) -> RunResult:
    """Train one head on one caption source and seed: ``data`` (built) or ``inputs`` (resolved upstream outputs)."""
    conf = train_options(settings, overrides)
    if data is None:
        if inputs is None:
            raise PipelineError("train_one needs the training data or the resolved upstream outputs (camim.graph.train_inputs)")
        data = load_data(settings, mllm, conf["head"], inputs)
    config, key, out_dir = plan_run(settings, data, mllm, seed, conf, run_id)
    run_id = out_dir.name
    say = (lambda *a: None) if quiet else print
    if not force and (done := finished_run(out_dir, key)) is not None:
        say(f"train [{run_id}]: already trained with this config; reusing {out_dir} (--force retrains)")
        return done
    from pipeline.store import folder_lock

    # one process trains a run at a time: a second one waits, then reuses what the first finished
    with folder_lock(out_dir, f"run {run_id}", "is training this run; waiting for it, then reusing it"):
        if not force and (done := finished_run(out_dir, key)) is not None:
            say(f"train [{run_id}]: trained by another process meanwhile; reusing {out_dir}")
            return done
        return _fit(settings, data, mllm, seed, conf, config, key, run_id, out_dir, force, say)


def plan_run(settings: Settings, data, mllm: str, seed: int, conf: dict, run_id: str | None = None) -> tuple[dict, str, Path]:
    """A run's config, key and folder (``conf``: :func:`train_options`), without training anything."""
    config = run_config(settings, data, mllm, seed, conf)
    key = key_of({k: v for k, v in config.items() if k != "models"})  # models are in the cache keys already
    run_id = run_id or settings.run or f"{conf['head']}-{mllm.replace(':', '-').replace('/', '_')}-s{seed}-{key[:8]}"
    return config, key, settings.runs_dir / run_id


def finished_run(out_dir: Path, key: str) -> RunResult | None:
    """The finished run in ``out_dir`` when it was trained under ``key``, else None."""
    mpath, cpath = out_dir / "metrics.json", out_dir / "config.json"
    if not (mpath.exists() and cpath.exists()):
        return None
    old = json.loads(cpath.read_text())
    return RunResult(out_dir.name, out_dir, json.loads(mpath.read_text()), old, reused=True) if old.get("key") == key else None


def _fit(settings: Settings, data, mllm: str, seed: int, conf: dict, config: dict, key: str, run_id: str, out_dir: Path,
         force: bool, say) -> RunResult:
    """The training of :func:`train_one`, under the run's lock."""
    head_name = conf["head"]
    head_cls = HEADS.get(head_name)
    mpath = out_dir / "metrics.json"
    device = pick_device(settings.device)
    amp = amp_dtype(str(conf["amp"]), device)
    if int(conf["threads"]) > 0:
        torch.set_num_threads(int(conf["threads"]))
    seed_all(seed)
    reset_peak()  # the run's peak memory from here: its data (held already) and its training
    model = head_cls(data.dims, len(data.labels), {k: v for k, v in conf.items() if k not in TRAINER_KEYS})
    if hasattr(model, "load_pretrained") and getattr(data, "pretrained", None):
        model.load_pretrained(data.pretrained)  # e.g. the cached top layers (still nothing but the cache)
    model = model.to(device)
    metrics = metric_fn(head_cls)
    train_rows = data.splits.get("train")
    if train_rows is None or "val" not in data.splits:
        raise PipelineError(f"task {settings.task}: training needs train and val splits, got {sorted(data.splits)}")
    bs = int(conf["batch_size"])
    epochs = int(conf["epochs"])
    if epochs < 1 or bs < 1:
        raise PipelineError(f"train: epochs and batch_size must be at least 1 (got {epochs}, {bs})")
    t_prep = time.perf_counter()
    if hasattr(model, "prepare_data"):
        model.prepare_data(data)  # e.g. a memory-reading top's frozen caption states, once per run, after the cheap checks
    t_prep = time.perf_counter() - t_prep  # counted in the run's wall time
    steps_per_epoch = math.ceil(len(train_rows) / bs)
    opt = adamw(param_groups(model, float(conf["weight_decay"]), float(conf["lr"])), float(conf["lr"]), device)
    sched = linear_schedule(opt, steps_per_epoch * epochs, float(conf["warmup"]))
    gen = torch.Generator().manual_seed(seed)
    ema = WeightAverage(model, decay, float(conf["ema_warmup"])) if (decay := float(conf["ema"])) else None
    if ema is not None and (note := ema.note(steps_per_epoch * epochs)):
        say(f"train [{run_id}]: {note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    old_key = None
    if (out_dir / "config.json").exists():
        try:
            old_key = json.loads((out_dir / "config.json").read_text()).get("key")
        except (OSError, json.JSONDecodeError):
            pass
    if force or old_key != key:
        ckpt.unlink(missing_ok=True)  # a checkpoint of another config (or --force) is never resumed
    atomic_write_json(out_dir / "config.json", {**config, "key": key, "profile": settings.conf, "source": settings.source})
    state = fresh_progress()
    if ckpt.exists():
        state = load_checkpoint(ckpt, model, opt, sched, gen, ema)
        say(f"train [{run_id}]: resuming after epoch {state['epoch']} from {ckpt}")
    best_f1, best_epoch, best_state = state["best_f1"], state["best_epoch"], state["best_state"]
    history = state["history"]
    t0 = time.perf_counter()
    n_seen = state["n_seen"]
    train_seconds = state["train_seconds"]
    from .curves import Curves

    curves = Curves(out_dir, conf.get("log", "jsonl"), resume_epoch=state["epoch"])
    every = max(1, int(conf.get("log_every", 20)))
    step = state["epoch"] * steps_per_epoch
    for epoch in range(state["epoch"] + 1, epochs + 1):
        model.train()
        te = time.perf_counter()
        sums: dict[str, float] = {}
        for rows in epoch_batches(train_rows, data.lengths, bs, int(conf["bucket"]), gen):
            b = _to(data.batch(rows), device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(b)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update()
            n_seen += len(b["label"])
            step += 1
            vals = {"loss": float(out["loss"].detach()), **{k: float(v.detach()) for k, v in out.get("aux", {}).items()}}
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % every == 0:
                curves.step(step, epoch, vals, float(sched.get_last_lr()[0]))
        train_seconds += time.perf_counter() - te
        with ema.swapped() if ema is not None else nullcontext():
            val, _ = evaluate(model, data, "val", conf, device, amp, metrics)
            better = val["f1"] > best_f1
            if better:
                best_f1, best_epoch = val["f1"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row = {"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}, "val_f1": val["f1"],
               "val_acc": val.get("acc"), "seconds": time.perf_counter() - te}
        history.append(row)
        curves.epoch(epoch, step, {k: v for k, v in row.items() if k != "epoch"})
        say(f"  epoch {epoch}/{epochs}: loss {row['loss']:.4f}" + "".join(f" {k} {row[k]:.4f}" for k in sums if k != "loss")
            + f"  val F1 {val['f1'] * 100:.2f}{' *' if better else ''}  ({row['seconds']:.1f}s)")
        save_checkpoint(ckpt, model, opt, sched, gen, {"epoch": epoch, "best_f1": best_f1, "best_epoch": best_epoch,
                                                       "best_state": best_state, "history": history, "n_seen": n_seen,
                                                       "train_seconds": train_seconds}, ema)
    curves.close()
    model.load_state_dict(best_state)
    results, pred_rows = {}, {"split": [], "index": [], "sample_id": [], "gold": [], "pred": [], "gold_label": [], "pred_label": []}
    for split in [s for s in ("val", "test") if s in data.splits]:
        m, preds = evaluate(model, data, split, conf, device, amp, metrics)
        results[split] = m
        idx = data.splits[split].tolist()
        gold = data.gold(split)
        pred_rows["split"] += [split] * len(idx)
        pred_rows["index"] += idx
        pred_rows["sample_id"] += [data.records[i]["sample_id"] for i in idx]
        pred_rows["gold"] += gold
        pred_rows["pred"] += preds
        name = getattr(data, "label_text", None) or data.labels.__getitem__  # NER: tag sequences
        pred_rows["gold_label"] += [name(g) for g in gold]
        pred_rows["pred_label"] += [name(p) for p in preds]
    wall = time.perf_counter() - t0 + t_prep
    metrics_doc = {
        "run_id": run_id,
        "head": head_name,
        "mllm": mllm,
        "seed": seed,
        "best_epoch": best_epoch,
        **results,
        "history": history,
        "modalities": data.modalities,
        "device": str(device),
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "train_samples_per_s": n_seen / train_seconds if train_seconds else 0.0,
        "wall_s": wall,
        # the process's peak resident memory while this run trained (a resumed run: its last part);
        # the report plans how many runs fit side by side from it
        "peak_memory_bytes": peak_memory(),
    }
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in best_state.items()}, str(out_dir / "model.safetensors"))
    atomic_write_table(out_dir / "predictions.parquet", pa.table(pred_rows))
    atomic_write_json(mpath, metrics_doc)
    ckpt.unlink(missing_ok=True)  # finished: model.safetensors holds the selected epoch
    t = results.get("test", {})
    say(f"train [{run_id}]: best epoch {best_epoch}, val F1 {best_f1 * 100:.2f}, test Acc {t.get('acc', 0) * 100:.2f} "
        f"P {t.get('precision', 0) * 100:.2f} R {t.get('recall', 0) * 100:.2f} F1 {t.get('f1', 0) * 100:.2f} "
        f"({wall:.1f}s) -> {out_dir}")
    return RunResult(run_id, out_dir, metrics_doc, config)


def run_settings(settings: Settings, run: str) -> tuple[Path, dict, Settings]:
    """A finished run's folder, its config, and the settings it was trained with."""
    run_dir = Path(run) if Path(run).is_dir() else settings.runs_dir / run
    cpath, wpath = run_dir / "config.json", run_dir / "model.safetensors"
    if not cpath.exists() or not wpath.exists():
        raise PipelineError(f"{run_dir}: not a finished run (needs config.json and model.safetensors)")
    config = json.loads(cpath.read_text())
    s = Settings(profile=settings.profile, cache_dir=settings.cache_dir, task=config["task"],
                 source=config.get("source"), device=settings.device, conf=config["profile"],
                 runs_dir=settings.runs_dir, reports_dir=settings.reports_dir, mllm=config["mllm"])
    return run_dir, config, s


def eval_run(settings: Settings, run_dir: Path, config: dict, inputs: dict) -> dict:
    """Re-score a run's checkpoint on val and test; the cache keys must match the run's.
    ``settings``/``config``/``run_dir`` from :func:`run_settings`, ``inputs`` resolved for them."""
    from safetensors.torch import load_file

    cpath, wpath = run_dir / "config.json", run_dir / "model.safetensors"
    conf = {**DEFAULTS, **config["options"]}
    data = load_data(settings, config["mllm"], config["head"], inputs)
    if data.cache_keys != config["cache_keys"]:
        raise PipelineError(f"{cpath}: the cached features changed since training "
                            f"(run: {config['cache_keys']}, now: {data.cache_keys}); re-run features with the run's profile")
    head_cls = HEADS.get(config["head"])
    device = pick_device(settings.device)
    model = head_cls(data.dims, len(data.labels), {k: v for k, v in conf.items() if k not in TRAINER_KEYS})
    model.load_state_dict(load_file(str(wpath)))
    model.to(device)
    amp = amp_dtype(str(conf.get("amp", "auto")), device)
    out = {}
    for split in ("val", "test"):
        if split in data.splits:
            out[split], _ = evaluate(model, data, split, conf, device, amp, metric_fn(head_cls))
            m = out[split]
            print(f"eval [{run_dir.name}] {split}: Acc {m.get('acc', 0) * 100:.2f} P {m['precision'] * 100:.2f} "
                  f"R {m['recall'] * 100:.2f} F1 {m['f1'] * 100:.2f} (n={m.get('n')})")
    atomic_write_json(run_dir / "metrics-eval.json", out)
    return out
