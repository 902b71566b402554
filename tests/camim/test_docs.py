"""The README, ARCHITECTURE, the profiles and the code point into RESULTS.md by section name: every
name they give is a section there, so a renamed or dropped section cannot leave a dangling pointer."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_results_section_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    headings = [h.strip() for h in re.findall(r"^### (.+)$", (ROOT / "RESULTS.md").read_text(), re.M)]
    named = set()
    files = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "pipeline" / "profiles").glob("*.toml"),
             *(ROOT / "stages").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    for line in (line for f in files for line in f.read_text().splitlines()):
        # "RESULTS.md, "<name>"" / "RESULTS.md "<name>"" in prose, and the last cell of the tries table
        named.update(re.findall(r'RESULTS\.md,? "([^"]+)"', line))
    tries = readme.split("**What was tried, and what it gave.**", 1)[1].split("\n\n", 2)[1]
    rows = [r for r in tries.splitlines() if r.startswith("|") and not r.startswith("|---")][1:]
    assert len(rows) >= 10
    for r in rows:
        named.update(re.findall(r'"([^"]+)"', r.rstrip(" |").rsplit("|", 1)[1]))
    assert len(named) >= 15
    missing = sorted(n for n in named if not any(h.startswith(n.rstrip(".")) for h in headings))
    assert not missing, f"README names RESULTS.md sections that do not exist: {missing}"
