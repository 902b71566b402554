"""Readers for MNRE text, ``ours_rel2id.json`` and CAMIM caption files.

Every problem is reported as ``file:line: what is wrong``.  With
``on_error="skip"`` bad lines are left out and returned as skipped rows instead.
Dict-per-line files are parsed with ``ast.literal_eval``; nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.errors import InputError, PipelineError


@dataclass
class ReadResult:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "line", "error"}


def check_image_name(name: object) -> str | None:
    """Why ``name`` is not a safe file name inside the image folder, or None."""
    if not isinstance(name, str) or not name.strip():
        return "img_id must be a non-empty string"
    if "\x00" in name:
        return "img_id contains a NUL byte"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"img_id {name!r} is an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return f"img_id {name!r} leaves the image folder ('..')"
    return None


def read_rel2id(path: Path) -> dict[str, int]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(str(path), "expected a JSON object {label: id}")
    ids = list(data.values())
    if not all(isinstance(v, int) for v in ids) or sorted(ids) != list(range(len(ids))):
        raise InputError(str(path), "label ids must be the integers 0..N-1, each once")
    return dict(data)


def _parse_literal(line: str) -> dict:
    try:
        obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a Python dict literal ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict, got {type(obj).__name__}")
    return obj


def _check_span(obj: dict, role: str, tokens: list[str]) -> tuple[str, int, int]:
    ent = obj.get(role)
    if not isinstance(ent, dict):
        raise ValueError(f"'{role}' must be a dict with 'name' and 'pos'")
    pos, name = ent.get("pos"), ent.get("name")
    if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(p, int) and not isinstance(p, bool) for p in pos)):
        raise ValueError(f"'{role}.pos' must be [start, end] integers")
    s, e = pos
    if e < s:
        raise ValueError(f"'{role}.pos' [{s}, {e}] is reversed: the start must come before the end")
    if e == s:
        raise ValueError(f"'{role}.pos' [{s}, {e}] is an empty span: the end is exclusive, so a one-token entity at {s} is [{s}, {s + 1}]")
    if s < 0 or e > len(tokens):
        raise ValueError(f"'{role}.pos' [{s}, {e}] is outside the sentence of {len(tokens)} tokens (valid: 0 <= start < end <= {len(tokens)})")
    if not isinstance(name, str):
        raise ValueError(f"'{role}.name' must be a string")
    if " ".join(tokens[s:e]) != name:
        raise ValueError(f"'{role}.name' {name!r} does not match tokens[{s}:{e}] = {' '.join(tokens[s:e])!r}")
    return name, s, e


def parse_mnre_line(line: str, rel2id: dict[str, int]) -> dict:
    obj = _parse_literal(line)
    missing = [k for k in ("token", "h", "t", "img_id", "relation") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    tokens = obj["token"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise ValueError("'token' must be a non-empty list of non-empty strings")
    h_name, h_s, h_e = _check_span(obj, "h", tokens)
    t_name, t_s, t_e = _check_span(obj, "t", tokens)
    why = check_image_name(obj["img_id"])
    if why:
        raise ValueError(why)
    rel = obj["relation"]
    if rel not in rel2id:
        raise ValueError(f"unknown relation {rel!r}")
    return {
        "tokens": tokens,
        "h_name": h_name,
        "h_start": h_s,
        "h_end": h_e,
        "t_name": t_name,
        "t_start": t_s,
        "t_end": t_e,
        "img_id": obj["img_id"],
        "label": rel,
        "label_id": rel2id[rel],
    }


BOM = b"\xef\xbb\xbf"


def read_bytes(path: Path) -> bytes:
    """A file's bytes without a leading UTF-8 BOM (Windows editors write one)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return data[len(BOM):] if data.startswith(BOM) else data


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (a BOM is accepted); bad bytes are one clear error naming the line."""
    data = read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{path}:{line}", f"not UTF-8 text ({exc.reason} at column {col})") from None


class LineError(ValueError):
    """A line that cannot even be decoded (raised by :func:`text_lines` consumers per line)."""


def text_lines(path: Path):
    """``(lineno, text)`` per line of a UTF-8 file, decoded line by line: a line with bad
    bytes yields ``(lineno, LineError)`` instead, so it can be reported or skipped alone."""
    data = read_bytes(path)
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            yield lineno, LineError(f"not UTF-8 text ({exc.reason} at column {exc.start + 1})")


def read_sample_lines(path: Path, split: str, parse, on_error: str = "stop") -> ReadResult:
    """One sample per non-empty line, parsed by ``parse(line) -> row`` (raising
    ValueError on a bad line). ``idx`` is the 0-based sample position, counting
    skipped lines too, so it stays the key of line-indexed side files (TMR/HVPNeT)."""
    path = Path(path)
    out = ReadResult()
    idx = 0
    for lineno, line in text_lines(path):
        if isinstance(line, str) and not line.strip():
            continue
        try:
            if isinstance(line, LineError):
                raise line
            row = parse(line)
        except ValueError as exc:
            if on_error == "stop":
                raise InputError(f"{path}:{lineno}", str(exc)) from None
            out.skipped.append({"file": str(path), "line": lineno, "error": str(exc)})
        else:
            row.update(split=split, idx=idx, line=lineno, file=path.name, sample_id=f"{split}-{idx:05d}")
            out.rows.append(row)
        idx += 1
    return out


def read_mnre(path: Path, split: str, rel2id: dict[str, int], on_error: str = "stop") -> ReadResult:
    """One MNRE split. ``idx`` is the 0-based line number (the key of TMR/HVPNeT side files)."""
    return read_sample_lines(path, split, lambda line: parse_mnre_line(line, rel2id), on_error)


def read_captions(path: Path, on_error: str = "stop") -> ReadResult:
    """A caption file in either CAMIM format.

    * dict-per-line: ``{'img_id': 'x.jpg', 'text': '...'}`` per line;
    * JSON: ``{"<img_id or stem>": "caption", ...}``.

    Rows are ``{"img_id", "caption", "line"}``; when an img_id repeats, the last wins
    (as in CAMIM's loader).
    """
    path = Path(path)
    head = read_bytes(path)[:4096].decode("utf-8", errors="replace")
    out = ReadResult()
    stripped = head.lstrip()
    if stripped.startswith("{") and (path.suffix == ".json" or stripped.startswith('{"') or "\n" not in stripped.strip()):
        text = read_text(path)  # one JSON document: bad bytes anywhere make it unreadable
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if path.suffix == ".json":
                raise InputError(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg})") from None
            data = None
        if isinstance(data, dict) and not ("img_id" in data and "text" in data):
            for img_id, cap in data.items():
                why = check_image_name(img_id) or (None if isinstance(cap, str) else "caption must be a string")
                if why:
                    if on_error == "stop":
                        raise InputError(f"{path}: item {img_id!r}", why)
                    out.skipped.append({"file": str(path), "line": 0, "error": f"item {img_id!r}: {why}"})
                    continue
                out.rows.append({"img_id": img_id, "caption": cap, "line": 0})
            return out
    for lineno, line in text_lines(path):
        if isinstance(line, str) and not line.strip():
            continue
        try:
            if isinstance(line, LineError):
                raise line
            obj = _parse_literal(line)
            if "img_id" not in obj or "text" not in obj:
                raise ValueError("expected keys 'img_id' and 'text'")
            why = check_image_name(obj["img_id"])
            if why:
                raise ValueError(why)
            if not isinstance(obj["text"], str):
                raise ValueError("'text' must be a string")
        except ValueError as exc:
            if on_error == "stop":
                raise InputError(f"{path}:{lineno}", str(exc)) from None
            out.skipped.append({"file": str(path), "line": lineno, "error": str(exc)})
            continue
        out.rows.append({"img_id": obj["img_id"], "caption": obj["text"], "line": lineno})
    return out
