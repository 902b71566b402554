"""The Python API, for notebooks and scripts: the same chain as the ``camim`` command.

    import camim

    s = camim.settings(source="../shared/data/mnre", cache_dir="cache")   # text={"cut": 2}: the fast setting
    camim.features(s, mllms=["none", "imported:qwen"])      # data -> captions -> text features (cached)
    data = camim.load(s, "imported:qwen")                    # tensors from the cache only
    data.sent_vec.shape, data.dims, data.labels[:3]
    df = camim.frame(s, "imported:qwen")                     # one row per sample, pooled features as lists
    run = camim.train(s, "imported:qwen", seed=1, epochs=4)  # runs/<run-id>/, reused when already trained
    run.metrics["test"]["f1"], run.dir
    rep = camim.report(s, ["none", "imported:qwen"], seeds=[1, 2, 3])
    rep["rows"][1]["significance"]                           # ΔF1, 95% CI, p against none

Every function takes a :class:`Settings`; keyword sections (``text={...}``, ``train={...}``) are
merged over the profile, exactly like a profile that ``extends`` it.
"""

from __future__ import annotations

from pipeline.config import Settings, load_profile, merge

__all__ = ["Settings", "settings", "features", "load", "frame", "train", "report"]


def settings(profile: str = "offline", **kw) -> Settings:
    """Settings from a profile; ``source``, ``cache_dir``, ``mllm``, ``task``, … as in the CLI, and
    any profile section as a dict (``train={"epochs": 4}``) merged over the profile."""
    sections = {k: kw.pop(k) for k in list(kw) if isinstance(kw[k], dict)}
    conf = merge(load_profile(profile), sections)
    return Settings(profile=profile, conf=conf, **kw)


def features(s: Settings, mllms: list[str] | None = None):
    """data → captions → text (and, with images, visual) features; returns (dataset, captions, text features)."""
    from . import chain

    return chain.features(s, mllms)


def load(s: Settings, mllm: str, head: str | None = None):
    """The training data of one caption source, from the cache only (``TrainData`` / ``NerData``)."""
    from stages.train.trainer import load_data, train_options

    from .graph import inputs_for

    return load_data(s, mllm, head or train_options(s)["head"], inputs_for(s, mllm))


def frame(s: Settings, mllm: str):
    """One row per sample (relation tasks): ids, tokens, spans, label, caption, pooled features."""
    import tempfile
    from pathlib import Path

    import pandas as pd

    from .export import export

    with tempfile.TemporaryDirectory() as tmp:
        paths = export(s, mllm, Path(tmp), "parquet")
        return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def train(s: Settings, mllm: str, seed: int = 1, **options):
    """Train (or reuse) one run; ``options`` are trainer/head options (``epochs``, ``lr``, ``head``, …)."""
    from stages.train.trainer import train_one

    from .graph import inputs_for

    return train_one(s, mllm, seed, options, inputs=inputs_for(s, mllm))


def report(s: Settings, sources: list[str] | None = None, seeds: list[int] | None = None, name: str | None = None,
           **options) -> dict:
    """The caption-model comparison; returns its rows (with significance) and the paths written."""
    from stages.report import run_report

    from .graph import resolver, shipped_sources

    sources = sources or list(s.section("report").get("sources") or []) or shipped_sources(s)
    return run_report(s, sources, resolver(s, sources), seeds, options, name)
