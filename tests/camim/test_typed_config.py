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


@pytest.mark.parametrize("where, value, match", [
    ("opt", {"top_lr": "abc"}, r"--opt top_lr = 'abc': expected a number, like its default 0.0001"),
    ("opt", {"cap_ens": "False"}, r"--opt cap_ens = 'False': expected true or false \(lower case\), like its default false"),
    ("opt", {"epochs": 2.5}, r"--opt epochs = 2.5: expected a whole number"),
    ("opt", {"joint": "xyz"}, r"--opt joint = 'xyz': expected true or false \(lower case\) or 'memory'"),
    ("profile", {"hidden": "wide"}, r"\[train\] hidden = 'wide': expected a whole number, like its default 128"),
    ("profile", {"align": 3}, r"\[train\] align = 3: expected a word"),
])
def test_an_option_of_the_wrong_type_is_an_error_naming_where_it_came_from(tmp_path, where, value, match):
    """A word where a number belongs would fail deep in training; "False" (TOML spells it false) would
    be a string, which is true."""
    from stages.train.trainer import train_options

    s = _settings(tmp_path, {"train": value} if where == "profile" else {})
    with pytest.raises(PipelineError, match=match):
        train_options(s, value if where == "opt" else None)


def test_options_of_the_right_type_pass_the_check(tmp_path):
    from stages.train.trainer import parse_opts, train_options

    over = parse_opts(["lr=1", "ema=0", "joint=memory", "joint=false", "cap_ens=true", "epochs=2", "align=S"])
    conf = train_options(_settings(tmp_path, {}), over)
    assert conf["lr"] == 1 and conf["joint"] is False and conf["cap_ens"] is True and conf["align"] == "S"
    assert train_options(_settings(tmp_path, {}), {"head": "remote", "levels": [1, 2]})["levels"] == [1, 2]  # no default type: unchecked
