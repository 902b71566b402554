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


def test_a_task_block_merges_over_the_profile_for_that_task_only(tmp_path):
    over = {"tasks": {"twitter17": {"text": {"cut": 6}, "train": {"head": "vecmner", "epochs": 15}}}}
    conf = merge(load_profile("offline"), over)
    tw = Settings(conf=conf, cache_dir=tmp_path / "c", task="twitter17")
    mnre = Settings(conf=conf, cache_dir=tmp_path / "c", task="mnre")
    assert tw.section("text")["cut"] == 6 and tw.section("train")["head"] == "vecmner" and tw.section("train")["epochs"] == 15
    assert tw.section("text")["model"] == mnre.section("text")["model"]  # the rest comes from the profile
    assert mnre.section("text")["cut"] == conf["text"]["cut"] and mnre.section("train")["head"] == "cam"
    check_profile(conf)


@pytest.mark.parametrize("over, match", [
    ({"tasks": {"twiter17": {"text": {"cut": 6}}}}, r"\[tasks.twiter17\]: unknown task \(known: .*twitter17"),
    ({"tasks": {"twitter17": {"txt": {"cut": 6}}}}, r"\[tasks.twitter17\] holds sections only .*not txt"),
    ({"tasks": {"twitter17": {"report": {"seed": [1]}}}}, r"\[tasks.twitter17.report\] unknown setting\(s\): seed"),
])
def test_a_bad_task_block_is_an_error_naming_it(over, match):
    with pytest.raises(PipelineError, match=match):
        check_profile(merge(load_profile("offline"), over))


@pytest.mark.parametrize("name", ["offline", "paper", "offline-levels"])
def test_every_shipped_profile_resolves_for_every_task(tmp_path, name):
    from stages.data import TASKS
    from stages.features import text_stage
    from stages.train.trainer import train_options

    for task in TASKS.names():
        s = Settings(profile=name, cache_dir=tmp_path / "c", task=task)
        stage = text_stage(s)  # checks [text]: a tuned cut needs layers = [-1]
        conf = train_options(s)
        assert stage.conf["cut"] >= 0 and conf["epochs"] > 0
