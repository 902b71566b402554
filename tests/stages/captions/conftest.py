"""Fixtures for the caption backends: real photos, fake API servers, tiny models."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_helpers import PHOTOS  # noqa: E402

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("no_proxy", "127.0.0.1,localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def photos(tmp_path) -> Path:
    """A writable copy of the six real photos."""
    d = tmp_path / "photos"
    shutil.copytree(PHOTOS, d, ignore=shutil.ignore_patterns("*.md"))
    return d


@pytest.fixture
def fake_server():
    from stages.captions.fake_server import FakeServer

    with FakeServer(hang=3.0) as srv:
        yield srv
