"""The captions stage: one caption per unique image, from a registered backend.

``MLLM=<backend>[:<arg>]`` picks the backend, e.g. ``imported:qwen``, ``none``.
Adding a backend = one file in this folder + one ``CAPTIONERS.add`` line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.runner import RunSummary
from pipeline.stage import Registry, Stage
from pipeline.store import StageCache, Store

log = logging.getLogger("camim")

#: captions longer than this many characters are cut at a word boundary, with a warning naming the
#: item (real captions are far shorter: MiniCPM-V averages ~400; the text encoder reads 40 pieces)
MAX_CAPTION_CHARS = 4000

CAPTIONERS = Registry("caption backend")
CAPTIONERS.add("imported", "stages.captions.imported:ImportedCaptioner")
CAPTIONERS.add("shuffled", "stages.captions.shuffled:ShuffledCaptioner")
CAPTIONERS.add("none", "stages.captions.none:NoCaptioner")
CAPTIONERS.add("dashscope", "stages.captions.dashscope_api:DashScopeCaptioner")
CAPTIONERS.add("openai", "stages.captions.openai_compat:OpenAICaptioner")
CAPTIONERS.add("openai-batch", "stages.captions.batch_api:OpenAIBatchCaptioner")
CAPTIONERS.add("dashscope-batch", "stages.captions.batch_api:DashScopeBatchCaptioner")
CAPTIONERS.add("vllm-batch", "stages.captions.batch_api:VllmBatchCaptioner")
CAPTIONERS.add("blip2", "stages.captions.hf_blip2:Blip2Captioner")
CAPTIONERS.add("instructblip", "stages.captions.hf_instructblip:InstructBlipCaptioner")
CAPTIONERS.add("llava-next", "stages.captions.hf_llava_next:LlavaNextCaptioner")
CAPTIONERS.add("qwen2-vl", "stages.captions.hf_qwen2_vl:Qwen2VLCaptioner")
CAPTIONERS.add("minicpm", "stages.captions.hf_minicpm:MiniCPMCaptioner")


class CaptionStage(Stage):
    name = "captions"
    version = "1"

    def __init__(self, captioner):
        self.captioner = captioner

    def key_config(self) -> dict:
        return self.captioner.key_config()

    def label(self) -> str:
        return self.captioner.label()

    @property
    def device(self) -> str:
        return self.captioner.device_name()

    def setup(self) -> None:
        self.captioner.setup()

    def for_workers(self, engine: str) -> None:
        if hasattr(self.captioner, "for_workers"):
            self.captioner.for_workers(engine)

    def teardown(self) -> None:
        self.captioner.teardown()

    def run(self, batch):
        out = self.captioner.caption(batch)
        for r in out:  # every backend: a caption longer than the cap is cut, with a warning naming the item
            cap = r.row.get("caption") if r.error is None else None
            if cap and len(cap) > MAX_CAPTION_CHARS:
                cut = cap[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0] or cap[:MAX_CAPTION_CHARS]
                log.warning("captions: the caption of %s has %d characters; cut to %d (the cap is %d)",
                            r.row.get("img_id") or r.item_key, len(cap), len(cut), MAX_CAPTION_CHARS)
                r.row["caption"] = cut
                r.row["caption_cut_from"] = len(cap)
        return out


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

    def lines(self, max_failures: int = 10) -> list[str]:
        """The summary line (done, cached, failed by reason, time), then tokens and
        estimated cost, then the failed items (all of them are in ``failures.jsonl``)."""
        out = [self.summary.line()]
        x = self.summary.extra
        if x.get("input_tokens") or x.get("output_tokens") or x.get("attempts") or x.get("cached_attempts"):
            line = f"  this run: tokens {x['input_tokens']} in, {x['output_tokens']} out"
            if x.get("attempts") or x.get("cached_attempts"):  # API backends: what this run sent and paid
                line += f"; {x['attempts']} requests sent; estimated cost ${x['cost_usd']:.4f}"
            out.append(line)
            if x.get("cached_attempts"):
                out.append(f"  served from the cache: {x['cached_items']} item(s), made earlier with "
                           f"{x['cached_attempts']} requests, ${x['cached_cost_usd']:.4f} (not paid again)")
        listed = (("skipped input lines", "skipped_lines", "skipped.jsonl", lambda f: f"{f['file']}:{f['line']}: {f['error']}"),
                  ("failed items", "failed_items", "failures.jsonl", lambda f: f"{f['img_id']}: {f['error']}"))
        for title, name, fname, fmt in listed:
            entries = x.get(name) or []
            if entries:
                out.append(f"  {title} ({len(entries)}, listed in {self.cache.files_dir / fname}):")
                out += [f"    {fmt(f)}" for f in entries[:max_failures]]
                if len(entries) > max_failures:
                    out.append(f"    ... {len(entries) - max_failures} more")
        return out


def make_captioner(mllm: str, settings: Settings):
    return CAPTIONERS.create(mllm, settings=settings)


def run_captions(settings: Settings, mllm: str, records: list[dict]) -> Captions:
    captioner = make_captioner(mllm, settings)
    stage = CaptionStage(captioner)
    items = captioner.items(records)
    bs = settings.batch_size or settings.section("captions").get("batch_size") or captioner.default_batch_size
    store = Store(settings.cache_dir)
    # items that failed transiently last time (an API outage, retries exhausted) are
    # tried again; permanent failures (400s, bad images) stay recorded and are not
    before = {p.stem for p in store.stage(stage.name, stage.key).part_paths()}  # what this run adds is new
    transient = _transient_failures(store.stage(stage.name, stage.key))
    retry = [it for it in items if it["item_key"] in transient]
    if retry:
        log.info("captions: retrying %d item(s) that failed transiently before", len(retry))
        settings.executor.run(stage, retry, store, batch_size=bs, retry_failed=True, desc=f"captions {stage.label()} (retry)", unit="img")
    cache, summary = settings.executor.run(stage, items, store, batch_size=bs, desc=f"captions {stage.label()}", unit="img")
    wanted = {it["item_key"] for it in items}
    _record_skipped(summary, cache, getattr(captioner, "skipped", None))
    rows = [r for r in cache.rows() if r["item_key"] in wanted]
    by_item = {r["item_key"]: (r.get("caption") or "") for r in rows if r["ok"]}
    _account(summary, cache, rows, before)
    return Captions(mllm, cache, summary, by_item, captioner)


def _record_skipped(summary: RunSummary, cache: StageCache, skipped: list[dict] | None) -> None:
    """Input lines left out with ``--on-error skip``: kept in ``files/skipped.jsonl`` (so a re-run
    served from the cache still lists them) and printed in the summary."""
    import json

    from pipeline.store import atomic_write_bytes

    path = cache.files_dir / "skipped.jsonl"
    if skipped is not None:  # the backend read its inputs in this run
        if skipped:
            atomic_write_bytes(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode("utf-8"))
        elif path.exists():
            path.unlink()
    if path.exists():
        summary.extra["skipped_lines"] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _transient_failures(cache: StageCache) -> set[str]:
    idx = cache.index()
    if idx.num_rows == 0 or "error" not in idx.column_names:
        return set()
    return {k for k, ok, err in zip(idx.column("item_key").to_pylist(), idx.column("ok").to_pylist(),
                                    idx.column("error").to_pylist()) if not ok and (err or "").startswith("transient")}


def _account(summary: RunSummary, cache: StageCache, rows: list[dict], parts_before: set[str]) -> None:
    """Tokens, cost and requests of what THIS run sent (rows in parts it wrote), and apart from
    them what the items served from the cache cost when they were made; list the failures."""
    fresh = [r for r in rows if r.get("part") not in parts_before]
    cached = [r for r in rows if r.get("part") in parts_before]

    def total(name, among=fresh):
        return sum((r.get(name) or 0) for r in among)

    failed = [{"item_key": r["item_key"], "img_id": r.get("img_id") or "", "error": r.get("error") or ""}
              for r in rows if not r["ok"]]
    summary.extra.update({
        "input_tokens": int(total("input_tokens")), "output_tokens": int(total("output_tokens")),
        "cost_usd": round(float(total("cost_usd")), 6), "attempts": int(total("attempts")),
        "cached_items": len(cached), "cached_attempts": int(total("attempts", cached)),
        "cached_cost_usd": round(float(total("cost_usd", cached)), 6),
        "failed_items": failed,
    })
    if failed:
        import json

        from pipeline.store import atomic_write_bytes

        text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failed)
        atomic_write_bytes(cache.files_dir / "failures.jsonl", text.encode("utf-8"))
