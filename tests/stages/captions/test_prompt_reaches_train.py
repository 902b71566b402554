"""Options reach every command that computes a key: captions with PROMPT=short, then train with
PROMPT=short, re-uses those captions (no new item, no request to the server)."""

from caption_helpers import mini_mnre
from typer.testing import CliRunner

from camim.cli import app


def test_train_with_the_same_prompt_reuses_the_captions(tmp_path, fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.openai_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    src, images, _ = mini_mnre(tmp_path)
    common = ["--source", str(src), "--image-dir", str(images), "--cache-dir", str(tmp_path / "c"),
              "--mllm", "openai:fake-vl", "--prompt", "short"]
    r = CliRunner().invoke(app, ["captions", *common])
    assert r.exit_code == 0, r.output
    sent = fake_server.state.requests
    assert sent > 0
    r = CliRunner().invoke(app, ["train", *common, "--runs-dir", str(tmp_path / "runs"), "--epochs", "1",
                                 "--opt", "hidden=16", "--opt", "heads=2"])
    assert r.exit_code == 0, r.output
    assert fake_server.state.requests == sent
    assert " 0 new" in r.output.split("captions [")[1].splitlines()[0]
    # and the dry-run gc that follows writes nothing into the cache
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*"))
    r = CliRunner().invoke(app, ["cache", "gc", *common, "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output and "dry run" in r.output
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "c").rglob("*")) == before
    assert "openai:fake-vl" not in r.output  # the captions the run used are kept
