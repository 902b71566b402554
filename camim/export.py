"""``camim export``: captions and features out of the cache, in the formats other code reads.

* ``--format camim`` (default): per split, ``<name>_<split>.txt`` with one
  ``{'img_id': ..., 'text': ...}`` dict per line, the format of CAMIM's ``camim_captions/``
  (what HVPNeT/TMR/CAMIM code reads; ``imported:<folder>`` reads it back);
* ``--format json``: one ``<name>.json`` object ``{img_id: caption}`` (CAMIM's other format);
* ``--format parquet``: one row per sample: ``sample_id, split, tokens, head, tail, label, img_id,
  caption`` and the pooled text features ``sent_vec`` (sentence) and ``cap_vec`` (caption; empty
  when there is none) as float lists, one file per split, so that
  ``datasets.load_dataset("parquet", data_files={"train": ".../train.parquet", ...})`` reads it.

Images shared by several samples get one caption line each time they occur in a split, in the
order of the split file (as CAMIM's files); a failed or empty caption is left out.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.store import atomic_write_bytes, atomic_write_json, atomic_write_table

FORMATS = ("camim", "json", "parquet")


def export(settings: Settings, mllm: str, out_dir: Path, fmt: str = "camim", name: str | None = None) -> list[Path]:
    from .graph import build, caption_node

    if fmt not in FORMATS:
        raise PipelineError(f"export --format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out_dir = Path(out_dir)
    name = name or mllm.replace(":", "-").replace("/", "_")
    if fmt == "parquet":
        return _features(settings, mllm, out_dir)
    g = build(settings, [mllm])
    c = g.resolve(caption_node(mllm))
    records = g.resolve("data").records.to_pylist()
    written = []
    if fmt == "json":
        seen = {}
        for r in records:
            text = c.for_record(r)
            if text:
                seen.setdefault(r["img_id"], text)
        path = out_dir / f"{name}.json"
        atomic_write_json(path, seen)
        written.append(path)
    else:
        by_split: dict[str, list[str]] = {}
        for r in records:
            text = c.for_record(r)
            if text:
                by_split.setdefault(r["split"], []).append(repr({"img_id": r["img_id"], "text": text}))
        for split, lines in by_split.items():
            path = out_dir / f"{name}_{split}.txt"
            atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
            written.append(path)
    print(f"export: captions of {mllm} [{c.cache.key}] -> {', '.join(str(p) for p in written)}")
    return written


def _features(settings: Settings, mllm: str, out_dir: Path) -> list[Path]:
    from stages.train.data import build_re_data

    from .graph import build, train_inputs

    if settings.task not in ("mnre", "umre"):
        raise PipelineError(f"export --format parquet covers relation tasks (mnre, umre), not {settings.task!r}")
    inputs = train_inputs(build(settings, [mllm]), mllm)
    data = build_re_data(settings, mllm, inputs)
    caps = [inputs["captions"]]
    written = []
    for split, rows in data.splits.items():
        idx = rows.tolist()
        recs = [data.records[i] for i in idx]
        table = pa.table({
            "sample_id": [r["sample_id"] for r in recs],
            "split": [split] * len(recs),
            "tokens": [list(r["tokens"]) for r in recs],
            "head": [[r["h_start"], r["h_end"]] for r in recs],
            "tail": [[r["t_start"], r["t_end"]] for r in recs],
            "label": [r["label"] for r in recs],
            "img_id": [r["img_id"] for r in recs],
            "caption": [caps[0].for_record(r) for r in recs],
            "sent_vec": data.sent_vec[rows].float().tolist(),
            "cap_vec": [v if h else [] for v, h in zip(data.cap_vec[rows].float().tolist(), data.has_cap[rows].tolist())],
        })
        path = out_dir / f"{split}.parquet"
        atomic_write_table(path, table)
        written.append(path)
    print(f"export: {len(data.records)} samples with captions of {mllm} and pooled features "
          f"[{data.cache_keys['text_features']}] -> {out_dir}")
    return written
