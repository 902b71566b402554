"""`--source download`: fetch, verify sha256, refuse a changed file, explain a closed network."""

import pytest

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_file
from stages.data import mnre


@pytest.fixture
def local_mirror(monkeypatch, sample_dir):
    """Point the download table at file:// URLs of the bundled sample (offline)."""
    table = {}
    for name in ["mnre_train.txt", "mnre_val.txt", "mnre_test.txt", "ours_rel2id.json", "camim_captions/qwen_val.txt"]:
        p = sample_dir / name
        table[name] = (p.as_uri(), sha256_file(p))
    monkeypatch.setattr(mnre, "DOWNLOADS", table)
    return table


def test_download_verifies_and_reuses(tmp_path, local_mirror, sample_dir):
    dest = mnre.download(tmp_path / "dl")
    assert sha256_file(dest / "mnre_val.txt") == sha256_file(sample_dir / "mnre_val.txt")
    assert (dest / "camim_captions" / "qwen_val.txt").exists()
    mtime = (dest / "mnre_val.txt").stat().st_mtime_ns
    mnre.download(tmp_path / "dl")  # verified files are not fetched again
    assert (dest / "mnre_val.txt").stat().st_mtime_ns == mtime


def test_download_rejects_a_changed_file(tmp_path, local_mirror, monkeypatch):
    url, _ = local_mirror["mnre_val.txt"]
    monkeypatch.setitem(mnre.DOWNLOADS, "mnre_val.txt", (url, "0" * 64))
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        mnre.download(tmp_path / "dl")
    assert not (tmp_path / "dl" / "mnre_val.txt").exists()


def test_closed_network_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(mnre, "DOWNLOADS", {"mnre_val.txt": ("http://127.0.0.1:9/mnre_val.txt", "")})
    with pytest.raises(PipelineError, match="set MNRE_SOURCE"):
        mnre.download(tmp_path / "dl", timeout=2)
