"""Path confinement: a file named by an index, a record or a link must stay inside its folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PipelineError


class PathEscape(PipelineError):
    """A path that resolves (through ``..``, an absolute entry or a symbolic link) outside its folder."""


def confine(path: str | Path, root: str | Path, what: str = "file") -> Path:
    """``path`` with links resolved, or :class:`PathEscape` naming it when it is not inside ``root``."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise PathEscape(f"{what} {str(path)!r} resolves to {real}, outside the folder {base}; refused")
    return real
