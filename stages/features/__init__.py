"""The features stage. Text side: ``text.TextFeatureStage``; image side: see issue 5.

``run_text_features`` caches features of every sentence of the dataset and of every
non-empty caption of the given caption runs.  Items are keyed by content, so a new
caption source adds only its captions, and sentence features are shared by all.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.runner import RunSummary
from pipeline.store import StageCache, Store

from .text import TextFeatureStage, caption_item, sentence_item, tokens_item


@dataclass
class TextFeatures:
    cache: StageCache
    summary: RunSummary
    stage: TextFeatureStage


def text_stage(settings: Settings) -> TextFeatureStage:
    return TextFeatureStage(settings.section("text"), device=settings.device)


def run_text_features(settings: Settings, records: list[dict], captions: list) -> TextFeatures:
    stage = text_stage(settings)
    # sequence-labelling records (NER: they carry "tags") get token items, others sentence items
    sents = [tokens_item(r) if "tags" in r else sentence_item(r) for r in records]
    caps = {}
    for c in captions:
        for text in c.by_item.values():
            if text:
                it = caption_item(text)
                caps.setdefault(it["item_key"], it)
    # longest first, sentences then captions: little padding per batch
    sents.sort(key=lambda it: -len(it["tokens"]))
    cap_items = sorted(caps.values(), key=lambda it: -len(it["text"]))
    bs = settings.batch_size or int(settings.section("text").get("batch_size", 64))
    cache, summary = settings.executor.run(stage, sents + cap_items, Store(settings.cache_dir), batch_size=bs, desc="text features",
                                           unit="seq")
    stage.write_top_layers(cache.files_dir)  # text.cut > 0: the pretrained top layers, once per key
    stage.teardown()
    return TextFeatures(cache, summary, stage)
