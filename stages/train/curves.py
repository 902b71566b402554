"""Training curves: per-step loss and per-epoch validation metrics, for every head.

``[train] log`` (``--log``): a comma list of sinks.
* ``jsonl`` (always on): ``runs/<id>/curves.jsonl``, one JSON object per line:
  ``{"step", "epoch", "loss", <aux terms>, "lr"}`` every ``log_every`` steps and
  ``{"epoch", "val_f1", "val_acc", ...}`` per epoch; plain text, offline, plots with pandas.
* ``tensorboard``: event files in ``runs/<id>/tb/`` (``tensorboard --logdir runs``); needs the
  ``tensorboard`` package (``pip install tensorboard``).
A resumed run appends after its last finished epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import PipelineError

SINKS = ("jsonl", "tensorboard")


class Curves:
    def __init__(self, run_dir: Path, sinks: str | list | None, resume_epoch: int = 0):
        names = [s.strip() for s in (sinks.split(",") if isinstance(sinks, str) else (sinks or [])) if s and s.strip()]
        unknown = sorted(set(names) - set(SINKS))
        if unknown:
            raise PipelineError(f"train.log: unknown sink(s) {', '.join(unknown)} (known: {', '.join(SINKS)})")
        self.path = Path(run_dir) / "curves.jsonl"
        if resume_epoch == 0 and self.path.exists():
            self.path.unlink()
        elif resume_epoch and self.path.exists():  # drop what the killed epoch had logged
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("epoch", 0) <= resume_epoch]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.f = open(self.path, "a")
        self.tb = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PipelineError("train.log = tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=None)

    def step(self, step: int, epoch: int, values: dict, lr: float) -> None:
        self.f.write(json.dumps({"step": step, "epoch": epoch, **values, "lr": lr}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.add_scalar("train/lr", lr, step)

    def epoch(self, epoch: int, step: int, values: dict) -> None:
        self.f.write(json.dumps({"epoch": epoch, "step": step, **values}) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"val/{k}", v, epoch)
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
