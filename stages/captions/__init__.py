"""The captions stage: one caption per unique image, from a registered backend.

``MLLM=<backend>[:<arg>]`` picks the backend, e.g. ``imported:qwen``, ``none``.
Adding a backend = one file in this folder + one ``CAPTIONERS.add`` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.runner import RunSummary, run_stage
from pipeline.stage import Registry, Stage
from pipeline.store import StageCache, Store

CAPTIONERS = Registry("caption backend")
CAPTIONERS.add("imported", "stages.captions.imported:ImportedCaptioner")
CAPTIONERS.add("none", "stages.captions.none:NoCaptioner")


class CaptionStage(Stage):
    name = "captions"
    version = "1"

    def __init__(self, captioner):
        self.captioner = captioner

    def key_config(self) -> dict:
        return self.captioner.key_config()

    def label(self) -> str:
        return self.captioner.label()

    def setup(self) -> None:
        self.captioner.setup()

    def teardown(self) -> None:
        self.captioner.teardown()

    def run(self, batch):
        return self.captioner.caption(batch)


@dataclass
class Captions:
    """A finished captions run: ``by_item`` maps caption item key → caption text.

    Use ``for_record(record)`` to get a sample's caption ("" when it has none:
    the no-caption baseline, or a failed item).
    """

    mllm: str
    cache: StageCache
    summary: RunSummary
    by_item: dict[str, str]
    captioner: object

    def for_record(self, record: dict) -> str:
        return self.by_item.get(self.captioner.item_key(record), "")


def make_captioner(mllm: str, settings: Settings):
    return CAPTIONERS.create(mllm, settings=settings)


def run_captions(settings: Settings, mllm: str, records: list[dict]) -> Captions:
    captioner = make_captioner(mllm, settings)
    stage = CaptionStage(captioner)
    items = captioner.items(records)
    bs = settings.batch_size or settings.section("captions").get("batch_size") or captioner.default_batch_size
    cache, summary = run_stage(stage, items, Store(settings.cache_dir), batch_size=bs, desc=f"captions {stage.label()}", unit="img",
                               engine=settings.engine, workers=settings.workers)
    wanted = {it["item_key"] for it in items}
    by_item = {r["item_key"]: (r.get("caption") or "") for r in cache.rows() if r["ok"] and r["item_key"] in wanted}
    return Captions(mllm, cache, summary, by_item, captioner)
