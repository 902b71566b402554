"""Image features: pooled vector, optional 7x7 grid and HVPNeT's 2x2 visual prefix.

One item is one image file (a dataset image, a grounding crop, a translation image or
one of its crops), keyed by the sha256 of its bytes, so an image shared by several
samples (or a crop cut twice) is encoded once.  Per item:

* ``pooled`` ``[C]``: global average of the last stage (ResNet50: 2048, Lite0: 1280);
* ``grid`` ``[C, 7, 7]`` (``image.grid = true``): the last stage map, as CAMIM/TMR
  feed their attention;
* ``prefix`` ``[C1+C2+C3+C4, 2, 2]`` (``image.prefix = true``): each of the four stage
  maps average-pooled with kernel = stride = side // 2 (HVPNeT; at 7x7 this keeps
  the top-left 6x6, as HVPNeT does), concatenated on channels.  HVPNeT then
  ``.view``-s it to ``[4, 3840]``; that reshaping is left to the head.
* rows: ``kind``, ``width``, ``height`` of the decoded source.

Decoding and resizing run in DataLoader worker processes that prefetch ahead of the
model; a missing, corrupt or truncated file becomes a per-item error (recorded in
the index with its reason) and the run goes on.

Fast path (default where it is safe): bf16 weights and activations on CPUs with AMX
or AVX512-BF16 and on CUDA for backbones whose bf16 features stay within cosine 0.999
of fp32 (ResNet50; not EfficientNet-Lite0, which ``auto`` runs in fp32),
channels_last and Conv+BatchNorm folding.  ``torch.compile`` is opt-in (``compile = true``
or ``"auto"``): its gain on CPU did not reproduce across our measurements.  Features are
stored as fp16 whatever the compute dtype; the compute dtype is part of the key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.stage import Stage
from pipeline.store import ItemResult
from stages import encoders

from . import backbones

log = logging.getLogger("camim")

DEFAULTS = {
    "backbone": "efficientnet-lite0",
    "weights": "packaged",
    "resize": 256,        # short side, bilinear with antialias (HVPNeT: Resize(256))
    "crop": 224,          # centre crop (HVPNeT: CenterCrop(224))
    "grid": False,
    "prefix": True,
    "compute_dtype": "auto",
    "store_dtype": "float16",
    "channels_last": True,
    "fuse_bn": True,
    "compile": False,     # true | auto (only for runs of >= compile_min_items images) | false; see ARCHITECTURE
    "compile_min_items": 3000,
    "batch_size": 32,
    "workers": "auto",
}


def image_conf(conf: dict) -> dict:
    out = dict(DEFAULTS)
    out.update({k: v for k, v in conf.items() if k in DEFAULTS})
    unknown = sorted(set(conf) - set(DEFAULTS))
    if unknown:
        raise PipelineError(f"[image] unknown setting(s): {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    if int(out["crop"]) > int(out["resize"]):
        raise PipelineError(f"[image] crop ({out['crop']}) must not exceed resize ({out['resize']})")
    return out


def image_item(key: str, path: str | None, kind: str, what: str = "") -> dict:
    """``what`` names the item in error messages when ``path`` is missing."""
    return {"item_key": key, "path": path, "kind": kind, "what": what or (path or "?")}


# -- decoding (runs in DataLoader workers) ------------------------------------
def decode(path: str | None, resize: int, crop: int, what: str = ""):
    """(uint8 tensor [3, crop, crop], (w, h), None) or (None, None, error)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    if not path:
        return None, None, f"missing image: {what or '?'} is not in the image folder"
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces a full decode: truncated files fail here
    except FileNotFoundError:
        return None, None, f"missing image: {path}"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        return None, None, f"unreadable image: {path}: {type(exc).__name__}: {exc}"
    size = im.size
    t = F.pil_to_tensor(im)
    t = F.resize(t, [resize], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    t = F.center_crop(t, [crop, crop])
    return t.contiguous(), size, None


class _Files:
    """A map-style dataset over item dicts; each worker decodes one file per index."""

    def __init__(self, items: list[dict], resize: int, crop: int):
        self.items, self.resize, self.crop = items, resize, crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        it = self.items[i]
        t, size, err = decode(it["path"], self.resize, self.crop, it.get("what", ""))
        return it["item_key"], t, size, err


def _as_list(batch):
    return batch


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(1, min(4, n // 2)) if n > 2 else 1


# -- the stage -----------------------------------------------------------------
@dataclass
class Prepared:
    module: object
    dtype: object
    channels_last: bool
    compiled: bool = False
    eager: object = None


class ImageFeatureStage(Stage):
    name = "image_features"
    version = "1"

    def __init__(self, conf: dict, device: str = "auto", workers: int | None = None):
        self.conf = image_conf(conf)
        self.backbone = backbones.create(self.conf["backbone"], str(self.conf["weights"]))
        self.identity = self.backbone.identity()
        self.device = encoders.pick_device(device)
        if self.conf["compute_dtype"] == "auto" and not self.backbone.bf16_safe:
            self.compute_dtype = "fp32"  # bf16 features of this backbone drift too far from fp32
        else:
            self.compute_dtype = encoders.pick_dtype(self.conf["compute_dtype"], self.device)
        w = workers if workers is not None else self.conf["workers"]
        self.workers = default_workers() if w in ("auto", None) else int(w)
        self.pending: list[dict] = []
        self.model = None
        self._it = None
        self._buf: dict[str, tuple] = {}

    def key_config(self) -> dict:
        c = self.conf
        return {
            "backbone": c["backbone"],
            "weights": self.identity,
            "preprocess": {
                "decode": "PIL convert(RGB), no EXIF rotation",
                "resize_short": int(c["resize"]),
                "interpolation": "bilinear+antialias",
                "center_crop": int(c["crop"]),
                "mean": list(self.backbone.mean),
                "std": list(self.backbone.std),
            },
            "outputs": {
                "pooled": "mean over the last stage",
                "grid": bool(c["grid"]),
                "prefix": "hvpnet avg_pool k=s=side//2 over 4 stages" if c["prefix"] else False,
            },
            "shapes": self.shapes(self.backbone.channels),
            "compute_dtype": self.compute_dtype,
            "fuse_bn": bool(c["fuse_bn"]),
            "store_dtype": c["store_dtype"],
        }

    def label(self) -> str:
        return f"{self.conf['backbone']} {self.compute_dtype} {self.conf['crop']}px"

    def shapes(self, channels) -> dict:
        side = int(self.conf["crop"]) // 32
        out = {"pooled": [channels[-1]]}
        if self.conf["grid"]:
            out["grid"] = [channels[-1], side, side]
        if self.conf["prefix"]:
            out["prefix"] = [sum(channels), 2, 2]
        return out

    # -- model ---------------------------------------------------------------
    def setup(self) -> None:
        import torch

        loaded = self.backbone.load()
        self.loaded = loaded
        self.model = prepare_model(loaded.module, self.device, self.compute_dtype, bool(self.conf["channels_last"]),
                                   bool(self.conf["fuse_bn"]), self._want_compile())
        self._torch = torch
        self._mean = torch.tensor(self.backbone.mean).view(1, 3, 1, 1).to(self.device) * 255
        self._std = torch.tensor(self.backbone.std).view(1, 3, 1, 1).to(self.device) * 255
        self._start_loader()

    def _want_compile(self) -> bool:
        """``compile = "auto"``: only for runs long enough to repay the compile time
        (about 30-80 s for ResNet50 on 2 CPU cores) and where inductor can build kernels.
        The default is ``false``: on 2 AMX cores the compiled ResNet50 was 1.75x faster in
        one run but no faster in four fresh-process repeats (see ARCHITECTURE)."""
        c = self.conf["compile"]
        if isinstance(c, str) and c.lower() in ("true", "false"):
            c = c.lower() == "true"
        if c != "auto":
            return bool(c)
        if len(self.pending) < int(self.conf["compile_min_items"]):
            return False
        if self.device.startswith("cuda"):
            return True
        import shutil

        return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))

    def _start_loader(self) -> None:
        import torch

        self._buf = {}
        if not self.pending:
            self._it = iter(())
            return
        ds = _Files(self.pending, int(self.conf["resize"]), int(self.conf["crop"]))
        bs = int(self.conf["batch_size"])
        if self.workers > 0:
            dl = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=self.workers, collate_fn=_as_list,
                                             prefetch_factor=2, pin_memory=self.device.startswith("cuda"))
        else:
            dl = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=0, collate_fn=_as_list)
        self._it = iter(dl)

    def teardown(self) -> None:
        self.model = None
        self._it = None
        self._buf = {}

    def _decoded(self, item: dict):
        """The decoded item: from the prefetching loader, else decoded here."""
        key = item["item_key"]
        while key not in self._buf and self._it is not None:
            try:
                for k, t, size, err in next(self._it):
                    self._buf[k] = (t, size, err)
            except StopIteration:
                self._it = None
            except Exception as exc:  # noqa: BLE001 - a dead worker: decode the rest in-process
                log.warning("image features: decode workers failed (%s: %s); decoding in-process", type(exc).__name__, exc)
                self._it = None
        if key in self._buf:
            return self._buf[key]
        t, size, err = decode(item["path"], int(self.conf["resize"]), int(self.conf["crop"]), item.get("what", ""))
        self._buf[key] = (t, size, err)
        return self._buf[key]

    def run(self, batch: list[dict]) -> list[ItemResult]:
        torch = self._torch
        dec = [self._decoded(it) for it in batch]
        good = [i for i, d in enumerate(dec) if d[2] is None]
        out: list[ItemResult] = []
        feats = {}
        if good:
            x = torch.stack([dec[i][0] for i in good]).to(self.device, non_blocking=True)
            feats = self.forward(x)
        sd = encoders.torch_dtype(self.conf["store_dtype"])
        row_of = {i: r for r, i in enumerate(good)}
        for i, it in enumerate(batch):
            t, size, err = dec[i]
            if err is not None:
                out.append(ItemResult(it["item_key"], row={"kind": it["kind"]}, error=err))
                continue
            r = row_of[i]
            out.append(ItemResult(it["item_key"], row={"kind": it["kind"], "width": size[0], "height": size[1]},
                                  tensors={n: v[r].to(sd) for n, v in feats.items()}))
        for it in batch:  # consumed only once the batch went through
            self._buf.pop(it["item_key"], None)
        return out

    def forward(self, x_uint8) -> dict:
        """uint8 ``[B,3,S,S]`` → fp32 CPU tensors ``{pooled, grid?, prefix?}``."""
        torch = self._torch
        m = self.model
        x = (x_uint8.float() - self._mean) / self._std
        x = x.to(m.dtype)
        if m.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        full = int(self.conf["batch_size"])
        if m.compiled and n < full:  # one static shape: pad the last batch instead of recompiling
            x = torch.cat([x, x[-1:].expand(full - n, *x.shape[1:])], 0)
        with torch.inference_mode():
            try:
                maps = m.module(x)
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the run
                if not m.compiled:
                    raise
                log.warning("image features: torch.compile failed (%s: %s); continuing eagerly", type(exc).__name__, str(exc)[:200])
                m.module, m.compiled = m.eager, False
                maps = m.module(x)
            maps = [f[:n] for f in maps]
            last = maps[-1]
            res = {"pooled": last.float().mean((2, 3))}
            if self.conf["grid"]:
                res["grid"] = last.float().contiguous()
            if self.conf["prefix"]:
                res["prefix"] = hvpnet_prefix([f.float() for f in maps])
        return {k: v.cpu() for k, v in res.items()}


def hvpnet_prefix(maps):
    """HVPNeT's visual prefix: each map average-pooled with kernel = stride = side // 2,
    then concatenated on channels → ``[B, sum C, 2, 2]``."""
    import torch
    import torch.nn.functional as F

    pooled = []
    for f in maps:
        k = f.shape[-1] // 2
        pooled.append(F.avg_pool2d(f, kernel_size=k, stride=k))
    return torch.cat(pooled, 1)


def prepare_model(module, device: str, compute_dtype: str, channels_last: bool, fuse_bn: bool, compile_: bool) -> Prepared:
    """Eval-mode, frozen, optionally BN-folded, cast and laid out for speed."""
    import torch

    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if fuse_bn:
        module = fold_batchnorm(module)
    dtype = encoders.torch_dtype(compute_dtype)
    module = module.to(device=device, dtype=dtype)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if compile_:
        return Prepared(torch.compile(module, dynamic=False), dtype, channels_last, True, module)
    return Prepared(module, dtype, channels_last, False, module)


def fold_batchnorm(module):
    """Fold each BatchNorm that directly consumes a Conv output into that conv.

    Uses torch.fx to trace the real data flow (so only true conv→bn edges are
    folded); an exact rewrite in fp32, done before any cast.  A model fx cannot
    trace is returned unchanged, with a log line."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception as exc:  # noqa: BLE001 - tracing limits are not errors
        log.info("image features: BatchNorm folding skipped (%s: %s)", type(exc).__name__, exc)
        return module
