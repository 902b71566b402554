"""One config, typed: an unknown section or setting is an error naming it and the known ones."""

import pytest

from camim.graph import build, check_profile
from pipeline.config import Settings, load_profile, merge
from pipeline.errors import PipelineError


def _settings(tmp_path, over: dict) -> Settings:
    return Settings(conf=merge(load_profile("offline"), over), cache_dir=tmp_path / "c", mllm="none")


def test_every_shipped_profile_is_valid():
    for name in ("offline", "paper", "offline-levels"):
        check_profile(load_profile(name))


@pytest.mark.parametrize("over, match", [
    ({"txt": {"cut": 1}}, r"unknown section\(s\) txt \(known: text, image"),
    ({"report": {"seed": [1]}}, r"\[report\] unknown setting\(s\): seed \(known: sources, seeds"),
])
def test_the_application_checks_sections(tmp_path, over, match):
    with pytest.raises(PipelineError, match=match):
        build(_settings(tmp_path, over), ["none"])


def test_each_stage_checks_its_own_section(tmp_path):
    from stages.captions import make_captioner
    from stages.features import text_stage
    from stages.train.trainer import train_options

    with pytest.raises(PipelineError, match=r"\[text\] unknown setting\(s\): max_lenn \(known: model, revision, max_len"):
        text_stage(_settings(tmp_path, {"text": {"max_lenn": 64}}))
    with pytest.raises(PipelineError, match=r"\[train\] unknown setting\(s\): hiden .*known: trainer head, epochs"):
        train_options(_settings(tmp_path, {"train": {"hiden": 64}}))
    train_options(_settings(tmp_path, {"train": {"d": 64, "n_cadf": 1}}))  # other heads' options are fine in a profile
    with pytest.raises(PipelineError, match=r"\[captions.openai\] unknown setting\(s\): rpmm \(known: .*rpm"):
        make_captioner("openai:m", _settings(tmp_path, {"captions": {"openai": {"rpmm": 60}}}))
    with pytest.raises(PipelineError, match=r"unknown option\(s\) 'alhpa' for head 'cam'"):
        train_options(_settings(tmp_path, {}), {"alhpa": 0.2})
