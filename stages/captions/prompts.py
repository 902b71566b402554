"""Caption prompts: versioned templates in ``prompts/``, selected with ``PROMPT=``.

A template is text with optional ``$sentence``, ``$head``, ``$tail`` fields
(:class:`string.Template`).  Without fields the prompt is the same for every image
(one caption per image); with fields it is rendered per sample and the caption
item becomes (image, rendered prompt).  Cache keys hold the rendered text, never the
file name: renaming a file re-runs nothing, editing it re-runs what it changes.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import asset_dir
from pipeline.errors import PipelineError
from pipeline.hashing import key_of

from .base import Captioner

PROMPT_DIR = asset_dir("prompts")
FIELDS = ("sentence", "head", "tail")


@dataclass(frozen=True)
class Prompt:
    name: str
    template: str

    @property
    def fields(self) -> set[str]:
        return {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(self.template)} - {None}

    @property
    def per_sample(self) -> bool:
        return bool(self.fields)

    def render(self, record: dict | None = None) -> str:
        if not self.per_sample:
            return self.template
        values = sample_fields(record or {})
        missing = [f for f in self.fields if not values.get(f)]
        if missing:
            where = record.get("sample_id") or record.get("img_id") if record else "?"
            raise PipelineError(
                f"prompt {self.name!r} needs {', '.join(sorted(missing))} but record {where} has none "
                "(this task has no sentences/entities: use PROMPT=camim or short)"
            )
        try:
            return string.Template(self.template).substitute(values)
        except (KeyError, ValueError) as exc:
            raise PipelineError(f"prompt {self.name!r}: bad template field {exc}; known fields: {', '.join(FIELDS)}") from None


def sample_fields(record: dict) -> dict[str, str]:
    tokens = record.get("tokens") or []
    sentence = record.get("sentence") or " ".join(tokens)
    return {"sentence": " ".join(str(sentence).split()), "head": record.get("h_name") or "", "tail": record.get("t_name") or ""}


def names() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def load_prompt(spec: str) -> Prompt:
    """``spec`` is a shipped name (``camim``, ``short``, ``entity``) or a path to a .txt file."""
    path = Path(spec)
    if not (path.suffix and path.is_file()):
        path = PROMPT_DIR / f"{spec}.txt"
    if not path.is_file():
        raise PipelineError(f"unknown prompt {spec!r}; shipped: {', '.join(names())} (or give a .txt path)")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise PipelineError(f"{path}: prompt file is empty")
    fields = {m.group("named") or m.group("braced") for m in string.Template.pattern.finditer(text)} - {None}
    unknown = fields - set(FIELDS)
    if unknown:
        raise PipelineError(f"{path}: unknown field(s) {', '.join('$' + f for f in sorted(unknown))}; known: "
                            + ", ".join("$" + f for f in FIELDS))
    return Prompt(path.stem, text)


class PromptedCaptioner(Captioner):
    """A captioner that sends a prompt with each image (API and local models).

    Every item carries its rendered ``prompt``; for a per-sample prompt the item key
    is (image key, rendered text), so captions stay reachable via ``for_record``.
    """

    def __init__(self, arg: str, settings):
        super().__init__(arg, settings)
        self.prompt = load_prompt(settings.prompt)

    def prompt_key(self) -> dict:
        return {"prompt": self.prompt.template} if not self.prompt.per_sample else {"prompt_template": self.prompt.template}

    def item_key(self, record: dict) -> str:
        if not self.prompt.per_sample:
            return record["image_key"]
        return key_of({"image": record["image_key"], "prompt": self.prompt.render(record)})

    def items(self, records: list[dict]) -> list[dict]:
        seen: dict[str, dict] = {}
        for r in records:
            k = self.item_key(r)
            if k not in seen:
                seen[k] = {"item_key": k, "img_id": r["img_id"], "image_path": r.get("image_path"),
                           "prompt": self.prompt.render(r)}
        return list(seen.values())
