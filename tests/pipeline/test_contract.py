"""The layering contract of ARCHITECTURE.md, checked on the source: every import, also those inside functions."""

import ast
from pathlib import Path

from tests.helpers import REPO


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for p in sorted((REPO / folder).rglob("*.py")):
        for mod in _imports(p):
            if mod.split(".")[0] in banned:
                bad.append(f"{p.relative_to(REPO)} imports {mod}")
    return bad


def test_the_engine_imports_no_stage_and_no_application_code():
    assert _offenders("pipeline", ("stages", "camim", "bench")) == []


def test_stages_never_import_the_application_layer():
    assert _offenders("stages", ("camim", "bench")) == []


def test_no_stage_runs_an_upstream_stage_itself():
    """Consumers get resolved outputs from the graph: the old chain module and its entry points are gone."""
    assert not (REPO / "stages" / "chain.py").exists()
    for p in sorted((REPO / "stages").rglob("*.py")):
        text = p.read_text()
        for call in ("run_visual(", "chain.features(", "chain.captions("):
            assert call not in text, f"{p.relative_to(REPO)} calls {call}"
