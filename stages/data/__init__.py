"""The data stage: dataset sources → a canonical Parquet manifest of records.

``TASKS`` maps ``TASK=`` names to readers.  A task's ``load(settings)`` returns the
records; ``prepare(settings)`` caches them under ``cache/data/<key>/files/`` where
the key is built from the content of every source file and the reader's version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Settings, asset_dir
from pipeline.errors import PipelineError
from pipeline.hashing import key_of, sha256_file, sha256_text
from pipeline.paths import PathEscape, confine
from pipeline.stage import Registry
from pipeline.store import Store, atomic_write_json, atomic_write_table

log = logging.getLogger("camim")

SAMPLE_DIR = asset_dir("sample")

TASKS = Registry("task")
TASKS.add("mnre", "stages.data.mnre:MnreTask")
TASKS.add("twitter15", "stages.data.twitter:Twitter2015Task")
TASKS.add("twitter17", "stages.data.twitter:Twitter2017Task")
TASKS.add("umre", "stages.data.umre:UmreTask")
TASKS.add("images", "stages.data.images:ImagesTask")


@dataclass
class Dataset:
    """What the data stage hands on: the records table and where it came from."""

    task: str
    key: str
    records: pa.Table
    source: Path
    path: Path

    def split(self, name: str) -> pa.Table:
        mask = pa.compute.equal(self.records.column("split"), name)
        return self.records.filter(mask)


def image_key(img_id: str, image_dir: Path | None) -> tuple[str, str | None]:
    """(content key, path) of an image: sha256 of its bytes when the file is there,
    else a key derived from its name (and no path)."""
    if image_dir is not None:
        p = Path(image_dir) / img_id
        if p.is_file():
            confine(p, image_dir, f"image {img_id!r}:")  # a link out of the image folder is refused
            return sha256_file(p), str(p)
    return sha256_text(f"image-name:{img_id}"), None


def get_task(settings: Settings):
    return TASKS.create(settings.task)


def prepare(settings: Settings, write: bool = True) -> Dataset:
    """Read, validate and cache the task's records (re-used when nothing changed).
    ``write=False`` (e.g. a dry-run ``cache gc``) builds them in memory and writes nothing."""
    task = get_task(settings)
    files = task.source_files(settings)
    image_dir = Path(settings.image_dir) if settings.image_dir else None
    if image_dir is None and hasattr(task, "image_dir"):  # a task that is a folder of images
        image_dir = task.image_dir(settings)
    key_config = {
        "task": settings.task,
        "reader": task.version,
        "files": {name: sha256_file(p) for name, p in sorted(files.items())},
        "on_error": settings.on_error,
        "images": _image_dir_fingerprint(image_dir),
    }
    key = key_of({"stage": "data", "config": key_config})
    sc = Store(settings.cache_dir).stage("data", key)
    path = sc.files_dir / "records.parquet"
    if path.exists():
        try:
            return Dataset(settings.task, key, pq.read_table(path), task.source_dir(settings), path)
        except (OSError, pa.ArrowException) as exc:  # damaged: it is derived from the sources, so rebuild it
            log.warning("data: the manifest %s is unreadable (%s); rebuilding it from the source files", path, exc)
    result = task.read(files, settings)
    rows = []
    for r in result.rows:
        try:
            r["image_key"], r["image_path"] = image_key(r["img_id"], image_dir)
        except PathEscape as exc:
            where = f"{r.get('file') or settings.task}:{r['line']}" if r.get("line") else f"record {r['sample_id']}"
            if settings.on_error == "stop":
                raise PipelineError(f"{where}: {exc} (--on-error skip leaves it out)") from None
            result.skipped.append({"file": str(r.get("file") or ""), "line": r.get("line") or 0, "error": str(exc)})
            continue
        rows.append(r)
    table = pa.Table.from_pylist(rows)
    if not write:
        return Dataset(settings.task, key, table, task.source_dir(settings), path)
    sc.write_spec({"stage": "data", "version": task.version, "key_config": key_config, "label": settings.task, "rows": len(rows)})
    if result.skipped:
        atomic_write_table(sc.files_dir / "skipped.parquet", pa.Table.from_pylist(result.skipped))
        log.warning("data: skipped %d bad line(s); listed in %s", len(result.skipped), sc.files_dir / "skipped.parquet")
    atomic_write_table(path, table)
    atomic_write_json(sc.dir / "done" / "records.json", {"rows": len(rows), "skipped": len(result.skipped)})
    return Dataset(settings.task, key, table, task.source_dir(settings), path)


def _image_dir_fingerprint(image_dir: Path | None) -> str | None:
    if image_dir is None:
        return None
    if not image_dir.is_dir():
        raise PipelineError(f"image folder {image_dir} does not exist")
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in image_dir.iterdir() if p.is_file())
    return key_of(entries)


def summary_lines(ds: Dataset) -> list[str]:
    t = ds.records
    lines = [f"data [{ds.key}]: {t.num_rows} records from {ds.source} -> {ds.path}"]
    splits = t.column("split").to_pylist()
    for sp in dict.fromkeys(splits):
        sub = ds.split(sp)
        n_img = len(set(sub.column("img_id").to_pylist()))
        lines.append(f"  {sp:<6} {sub.num_rows:>6} samples, {n_img:>5} images")
    return lines
