"""``camim cache gc``: keep what the current config reaches, remove the rest.

Reached: every key of the graph of the current settings (``camim/graph.py``: data, the
captions of every caption source named, default ``none`` plus every shipped one, text
features, and with an image source grounding, image features and streams), and every cache key recorded by a run in the runs folder
in effect (``--runs-dir`` / ``RUNS_DIR``, default ``runs/``) or in a ``--keep-runs`` folder.
Runs kept anywhere else are not seen: name their folder with ``--keep-runs``.
Orphaned temporary files of killed runs are removed too.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.store import Store

#: names under which runs record a cache key, when it is not the store stage's own name
RECORDED_AS = {"stream:image": "image_streams", "umre_crops": "image_features"}


def live_keys(settings: Settings, explicit_mllm: bool, extra_runs: list[Path] | tuple = ()) -> set[tuple[str, str]]:
    """What the graph of the current settings reaches (computed from keys: nothing runs, nothing is
    written), what runs recorded, and what the recorded image streams were assembled from."""
    from stages.features.visual import recorded_upstream

    from .graph import build, shipped_sources

    keys = build(settings, settings.mllms if explicit_mllm else shipped_sources(settings)).live()
    for cfg in [c for d in (settings.runs_dir, *extra_runs) for c in Path(d).glob("*/config.json")]:
        try:
            recorded = json.loads(cfg.read_text()).get("cache_keys", {})
        except (OSError, json.JSONDecodeError):
            continue
        for stage, key in _flatten(recorded):
            keys.add((RECORDED_AS.get(stage, stage), key))
    for stage, key in list(keys):
        if stage == "image_streams":
            keys |= recorded_upstream(settings.cache_dir, key)
    return keys


def _flatten(recorded: dict):
    for stage, val in recorded.items():
        if isinstance(val, str):
            yield stage, val
        elif isinstance(val, dict):
            for v in val.values():
                if isinstance(v, str):
                    yield stage, v
        elif isinstance(val, list):
            for v in val:
                if isinstance(v, str):
                    yield stage, v


def collect(settings: Settings, explicit_mllm: bool, yes: bool, extra_runs: list[Path] | tuple = ()) -> int:
    store = Store(settings.cache_dir)
    for d in extra_runs:
        if not Path(d).is_dir():
            raise PipelineError(f"--keep-runs {d}: no such folder")
    live = live_keys(settings, explicit_mllm, extra_runs)
    freed = 0
    for sc in store.entries():
        orphans = sc.orphans()
        if (sc.stage, sc.key) not in live and sc.stage != "downloads":
            size = sum(p.stat().st_size for p in sc.dir.rglob("*") if p.is_file())
            print(f"{'removed' if yes else 'would remove'} {sc.stage}/{sc.key} ({size} bytes) {sc.spec().get('label', '')}")
            if yes:
                freed += store.remove(sc)
        elif orphans:
            for p in orphans:
                print(f"{'removed' if yes else 'would remove'} orphan {p}")
                if yes:
                    freed += p.stat().st_size
                    p.unlink()
    print(f"gc: {'freed' if yes else 'would free'} {freed if yes else 'see above'} bytes" if yes else "gc: dry run; pass --yes to delete")
    return freed
