"""Twitter-2015 / Twitter-2017 multimodal NER (CoNLL text as pre-processed by UMT).

A source is a folder holding ``train.txt``, ``valid.txt`` and ``test.txt``.  Each tweet
is an ``IMGID:<id>`` line, then one ``token<TAB>tag`` line per word, then a blank line.
Tags are BIO over PER/LOC/ORG and OTHER (2015) or MISC (2017); OTHER is mapped to MISC
so both datasets share one tag set.  Orphan ``I-X`` tags (an ``I-`` after ``O`` or after
another type, 374 of them in Twitter-2015) are kept as they are: seqeval's default
(conlleval) mode counts each as an entity, and so do the published numbers.

Without ``--source`` the small real sample bundled in ``data/sample/twitter20xx`` is
used.  Records carry ``tokens``, ``tags``, ``tag_ids`` and ``img_id`` (``<id>.jpg``);
the ``valid`` split is called ``val`` like in every other task.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Settings, asset_dir
from pipeline.errors import InputError, PipelineError

from .readers import LineError, ReadResult, check_image_name, text_lines

FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}
TYPES = ("PER", "LOC", "ORG", "MISC")
#: the tag set shared by both datasets; index = tag id
TAGS = ("O",) + tuple(f"{p}-{t}" for t in TYPES for p in ("B", "I"))
TAG2ID = {t: i for i, t in enumerate(TAGS)}
RENAME = {"OTHER": "MISC"}

log = logging.getLogger("camim")


def normalise_tag(tag: str) -> str:
    """``B-OTHER`` → ``B-MISC``; raises ValueError for a tag outside the BIO set."""
    if tag == "O":
        return tag
    prefix, _, typ = tag.partition("-")
    typ = RENAME.get(typ, typ)
    if prefix not in ("B", "I") or typ not in TYPES:
        raise ValueError(f"unknown tag {tag!r} (expected O or B-/I- with {', '.join(TYPES)} or OTHER)")
    return f"{prefix}-{typ}"


def read_conll(path: Path, split: str, on_error: str = "stop") -> ReadResult:
    """One split.  ``line`` is the line of the ``IMGID:`` header; ``idx`` the tweet's
    0-based position in the file."""
    path = Path(path)
    out = ReadResult()

    def fail(lineno: int, what: str, start: int) -> None:
        if on_error == "stop":
            raise InputError(f"{path}:{lineno}", what)
        out.skipped.append({"file": str(path), "line": lineno, "error": what, "tweet_line": start})

    idx = 0
    cur: dict | None = None
    bad = False

    def close() -> None:
        nonlocal cur, idx, bad
        if cur is not None:
            if not cur["tokens"] and not bad:
                fail(cur["line"], f"tweet IMGID:{cur['img_id']} has no tokens", cur["line"])
                bad = True
            if not bad:
                cur.update(split=split, idx=idx, sample_id=f"{split}-{idx:05d}")
                cur["tag_ids"] = [TAG2ID[t] for t in cur["tags"]]
                out.rows.append(cur)
            idx += 1
        cur, bad = None, False

    lines = list(text_lines(path))  # decoded line by line: bad bytes spoil one tweet, not the file
    if lines and lines[-1][1] == "":
        lines.pop()
    for lineno, line in lines:
        if isinstance(line, LineError):
            if cur is None:
                cur = {"img_id": "", "line": lineno, "tokens": [], "tags": []}
            if not bad:
                fail(lineno, str(line), cur["line"])
            bad = True
            continue
        if not line.strip():
            close()
            continue
        if line.startswith("IMGID:"):
            close()
            img = line[len("IMGID:"):].strip()
            cur = {"img_id": f"{img}.jpg", "line": lineno, "tokens": [], "tags": []}
            why = check_image_name(img) if img else "empty image id after IMGID:"
            if why:
                fail(lineno, why, lineno)
                bad = True
            continue
        if cur is None:
            fail(lineno, "token line before any IMGID: line", lineno)
            cur, bad = {"img_id": "", "line": lineno, "tokens": [], "tags": []}, True
            continue
        if bad:
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0] or not fields[1].strip():  # a token may be a lone NBSP
            fail(lineno, f"expected 'token<TAB>tag', got {line[:60]!r}", cur["line"])
            bad = True
            continue
        try:
            tag = normalise_tag(fields[1].strip())
        except ValueError as exc:
            fail(lineno, str(exc), cur["line"])
            bad = True
            continue
        cur["tokens"].append(fields[0])
        cur["tags"].append(tag)
    close()
    return out


def caption_files(root: Path, name: str, what: str) -> list[Path]:
    """Caption files of ``MLLM=imported:<name>`` for a task without shipped captions: a
    file, a folder, or ``<root>/<name>_<split>.txt``.  A shipped name that is not there
    (the default ``imported:qwen``) gives no file: every image is then recorded as
    uncaptioned and the heads run text-only, which the run's ``metrics.json`` records."""
    direct = Path(name)
    if direct.is_file():
        return [direct]
    if direct.is_dir():
        files = sorted(p for p in direct.iterdir() if p.suffix in (".txt", ".json"))
        if files:
            return files
        raise PipelineError(f"caption folder {direct} has no .txt or .json files")
    files = sorted(root.glob(f"{name}_*.txt")) if root.is_dir() else []
    if not files:
        if "/" in name or "." in name:
            raise PipelineError(f"caption file or folder {name!r} does not exist")
        log.warning("%s ships no captions named %r: every image is uncaptioned (text only); MLLM=none says so explicitly",
                    what, name)
    return files


class TwitterTask:
    """``TASK=twitter15`` / ``TASK=twitter17``."""

    kind = "ner"
    version = "1"
    year = "2017"

    def __init__(self, arg: str = ""):
        self.arg = arg
        self.name = f"twitter{self.year[2:]}"

    def source_dir(self, settings: Settings) -> Path:
        if not settings.source:
            return asset_dir("sample") / f"twitter{self.year}"
        path = Path(settings.source)
        if not path.is_dir():
            raise PipelineError(f"Twitter-{self.year} source {path} is not a folder")
        return path

    def source_files(self, settings: Settings) -> dict[str, Path]:
        root = self.source_dir(settings)
        files = {}
        for split, name in FILES.items():
            p = root / name
            if not p.is_file():
                raise PipelineError(f"{root}: no {name} (a Twitter-{self.year} source holds train.txt, valid.txt, test.txt)")
            files[split] = p
        return files

    def read(self, files: dict[str, Path], settings: Settings) -> ReadResult:
        out = ReadResult()
        for split in FILES:
            res = read_conll(files[split], split, settings.on_error)
            out.rows.extend(res.rows)
            out.skipped.extend(res.skipped)
        return out

    def labels(self, settings: Settings | None = None) -> list[str]:
        return list(TAGS)

    def caption_sources(self, settings: Settings) -> list[str]:
        d = self.source_dir(settings) / "captions"
        return sorted({p.name.rsplit("_", 1)[0] for p in d.glob("*_*.txt")}) if d.is_dir() else []

    def caption_files(self, settings: Settings, name: str) -> list[Path]:
        """Imported per-image captions: a file, a folder, or ``captions/<name>_<split>.txt``
        of the source folder (same formats as MNRE's CAMIM caption files)."""
        return caption_files(self.source_dir(settings) / "captions", name, f"Twitter-{self.year}")

class Twitter2015Task(TwitterTask):
    year = "2015"


class Twitter2017Task(TwitterTask):
    year = "2017"
