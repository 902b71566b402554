"""Plain table writers shared by the report pages (text, Markdown, HTML) and the sources' display names."""

from __future__ import annotations

import html

DISPLAY = {"none": "none (text only)", "imported:blip2": "BLIP-2", "imported:instructblip": "InstructBLIP",
           "imported:qwen": "QwenVL-Plus", "imported:minicpm": "MiniCPM-V"}


def display(source: str) -> str:
    """A source's name in a report: the paper's MLLM names; ``shuffled:<x>`` as its source's name + "shuffled"."""
    backend, _, arg = source.partition(":")
    if backend == "shuffled":
        return f"{DISPLAY.get('imported:' + arg, arg)}, shuffled"
    return DISPLAY.get(source, source)


def control_of(source: str) -> str | None:
    """The content control of an imported source (``imported:x`` → ``shuffled:x``), else None."""
    backend, _, arg = source.partition(":")
    return f"shuffled:{arg}" if backend == "imported" and arg else None


def html_text(md: str) -> str:
    """A line of Markdown prose as HTML: escaped, with `code` spans as <code>."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(md))


def pct(ms: tuple[float, float]) -> str:
    return f"{ms[0] * 100:.2f} ± {ms[1] * 100:.2f}"


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
