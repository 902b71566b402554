"""UMRE (REMOTE, ACM MM 2025): unified multimodal RE where an argument may be a textual
entity or a visual object.

A source folder holds:
  * ``{train,val,test}_set.json``: one Python dict literal per line (MNRE style, parsed
    with ``ast.literal_eval``): ``token``, ``h``, ``t``, ``img_id``, ``relation``.  An
    argument is a **textual entity** when its ``pos`` is ``[start, end)`` word indices and
    a **visual object** when its ``name`` is ``[OBJk]`` and its ``pos`` has 4 numbers;
    as in the released loader, an object's box is read from the box file, not from ``pos``;
  * ``pos_umke.json``: ``{image: {"[OBJk]": [x1, y1, x2, y2]}}`` normalised to 0..1 (at
    most 12 objects per image); coordinates slightly outside 0..1 are clamped, as the
    known adaptations do; an empty box after clamping is an error;
  * ``rel2id_umke_partner.json`` (or ``rel2id.json``): ``none`` must be id 0.

Records are MNRE-like so the text features and the RE batch work unchanged: an object
argument gets the empty span ``[0, 0)`` (no marker around any word) and ``h_obj`` /
``t_obj`` give its slot in the record's ``obj_names`` / ``obj_boxes`` (the image's
objects sorted by k); -1 for a textual argument.  ``pair`` is ``text-text``,
``text-object``, ``object-text`` or ``object-object``.

Without ``--source`` the small **synthetic** sample in ``data/sample/umre`` is used (UMRE
itself is not reachable here); its ``images/`` folder is the default ``IMAGE_DIR``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.config import Settings, asset_dir
from pipeline.errors import InputError, PipelineError

from .readers import (
    ReadResult,
    _check_span,
    _parse_literal,
    check_image_name,
    read_rel2id,
    read_sample_lines,
)

SPLITS = ("train", "val", "test")
SAMPLE = asset_dir("sample") / "umre"
OBJ = re.compile(r"^\[OBJ(\d+)\]$")
MAX_OBJECTS = 12


def read_boxes(path: Path) -> dict[str, dict[str, list[float]]]:
    """``pos_umke.json`` → ``{image: {"[OBJk]": [x1, y1, x2, y2]}}`` (validated, clamped)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "expected a JSON object {image: {\"[OBJk]\": [x1, y1, x2, y2]}}")
    out: dict[str, dict[str, list[float]]] = {}
    for img, objs in data.items():
        where = f"{path}: image {img!r}"
        if not isinstance(objs, dict):
            raise InputError(where, "expected an object {\"[OBJk]\": box}")
        if len(objs) > MAX_OBJECTS:
            raise InputError(where, f"{len(objs)} objects; UMRE has at most {MAX_OBJECTS} per image")
        boxes = {}
        for name, box in objs.items():
            if not OBJ.match(str(name)):
                raise InputError(where, f"object name {name!r} is not [OBJk]")
            if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
                raise InputError(where, f"{name}: box must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            x1, y1, x2, y2 = (min(1.0, max(0.0, float(v))) for v in box)
            if not (x2 > x1 and y2 > y1):
                raise InputError(where, f"{name}: empty box {list(box)} (need x2 > x1 and y2 > y1 within 0..1)")
            boxes[name] = [x1, y1, x2, y2]
        out[img] = dict(sorted(boxes.items(), key=lambda kv: int(OBJ.match(kv[0]).group(1))))
    return out


def _arg(obj: dict, role: str, tokens: list[str], objs: dict[str, list[float]] | None, img: str):
    ent = obj.get(role)
    if not isinstance(ent, dict):
        raise ValueError(f"'{role}' must be a dict with 'name' and 'pos'")
    name, pos = ent.get("name"), ent.get("pos")
    if isinstance(pos, (list, tuple)) and len(pos) == 4:
        if not isinstance(name, str) or not OBJ.match(name):
            raise ValueError(f"'{role}' has a 4-number pos (a visual object) but its name {name!r} is not [OBJk]")
        if not objs or name not in objs:
            raise ValueError(f"'{role}' object {name} has no box for image {img!r} in the box file")
        return name, 0, 0, list(objs).index(name)
    n, s, e = _check_span(obj, role, tokens)
    return n, s, e, -1


def parse_umre_line(line: str, rel2id: dict[str, int], boxes: dict) -> dict:
    obj = _parse_literal(line)
    missing = [k for k in ("token", "h", "t", "img_id", "relation") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    tokens = obj["token"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise ValueError("'token' must be a non-empty list of non-empty strings")
    why = check_image_name(obj["img_id"])
    if why:
        raise ValueError(why)
    img = obj["img_id"]
    objs = boxes.get(img) or boxes.get(img.rsplit(".", 1)[0])
    h_name, h_s, h_e, h_obj = _arg(obj, "h", tokens, objs, img)
    t_name, t_s, t_e, t_obj = _arg(obj, "t", tokens, objs, img)
    rel = obj["relation"]
    if rel not in rel2id:
        raise ValueError(f"unknown relation {rel!r}")
    kinds = ["object" if k >= 0 else "text" for k in (h_obj, t_obj)]
    return {
        "tokens": tokens, "h_name": h_name, "h_start": h_s, "h_end": h_e, "t_name": t_name, "t_start": t_s, "t_end": t_e,
        "img_id": img, "label": rel, "label_id": rel2id[rel], "h_obj": h_obj, "t_obj": t_obj, "pair": "-".join(kinds),
        "obj_names": list(objs or {}), "obj_boxes": [list(b) for b in (objs or {}).values()],
    }


def read_umre(path: Path, split: str, rel2id: dict[str, int], boxes: dict, on_error: str = "stop") -> ReadResult:
    return read_sample_lines(path, split, lambda line: parse_umre_line(line, rel2id, boxes), on_error)


class UmreTask:
    name = "umre"
    version = "1"
    kind = "umre"

    def __init__(self, arg: str = ""):
        self.arg = arg

    def source_dir(self, settings: Settings) -> Path:
        if not settings.source:
            return SAMPLE
        path = Path(settings.source)
        if not path.is_dir():
            raise PipelineError(f"UMRE source {path} is not a folder")
        return path

    def image_dir(self, settings: Settings) -> Path | None:
        d = self.source_dir(settings) / "images"
        return d if d.is_dir() else None

    def source_files(self, settings: Settings) -> dict[str, Path]:
        root = self.source_dir(settings)
        files: dict[str, Path] = {}
        for split in SPLITS:
            p = root / f"{split}_set.json"
            if not p.is_file():
                raise PipelineError(f"{root}: no {split}_set.json (a UMRE source holds {{train,val,test}}_set.json, pos_umke.json, rel2id)")
            files[split] = p
        rel = next((p for p in (root / "rel2id_umke_partner.json", root / "rel2id.json") if p.is_file()), None)
        if rel is None:
            raise PipelineError(f"{root}: no rel2id_umke_partner.json (or rel2id.json)")
        files["rel2id"] = rel
        if not (root / "pos_umke.json").is_file():
            raise PipelineError(f"{root}: no pos_umke.json (the per-image object boxes)")
        files["boxes"] = root / "pos_umke.json"
        return files

    def labels(self, settings: Settings) -> list[str]:
        rel2id = read_rel2id(self.source_files(settings)["rel2id"])
        labels = [k for k, _ in sorted(rel2id.items(), key=lambda kv: kv[1])]
        if labels[0].lower() != "none":
            raise PipelineError(f"{self.source_files(settings)['rel2id']}: id 0 must be the negative label 'none', not {labels[0]!r}")
        return labels

    def read(self, files: dict[str, Path], settings: Settings) -> ReadResult:
        self.labels(settings)
        rel2id = read_rel2id(files["rel2id"])
        boxes = read_boxes(files["boxes"])
        out = ReadResult()
        for split in SPLITS:
            res = read_umre(files[split], split, rel2id, boxes, settings.on_error)
            out.rows.extend(res.rows)
            out.skipped.extend(res.skipped)
        return out

    def caption_sources(self, settings: Settings) -> list[str]:
        return []

    def caption_files(self, settings: Settings, name: str) -> list[Path]:
        from .twitter import caption_files

        return caption_files(self.source_dir(settings) / "captions", name, "UMRE")
