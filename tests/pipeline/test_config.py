"""Profiles: `extends` merges a profile over its parent, so each holds only its differences."""

import pytest

from pipeline.config import PROFILE_DIR, load_profile
from pipeline.errors import PipelineError


def test_shipped_profiles_extend_the_base_and_hold_only_differences():
    import tomllib

    base = load_profile("offline")
    assert "extends" not in tomllib.loads((PROFILE_DIR / "offline.toml").read_text())
    for name in ("paper", "offline-levels"):
        raw = tomllib.loads((PROFILE_DIR / f"{name}.toml").read_text())
        assert raw.pop("extends") == "offline"
        for sec, vals in raw.items():  # nothing restated with the parent's value
            assert all(base[sec].get(k) != v for k, v in vals.items()), (name, sec)
    levels = load_profile("offline-levels")
    assert levels["text"]["layers"] == [-4, -3, -2, -1] and levels["text"]["cut"] == 0
    assert levels["train"] == base["train"] and levels["text"]["model"] == base["text"]["model"]


def test_a_user_profile_extends_by_name_or_path_and_a_circle_is_an_error(tmp_path):
    (tmp_path / "mine.toml").write_text('extends = "paper"\n[train]\nepochs = 2\n')
    (tmp_path / "more.toml").write_text('extends = "mine.toml"\n[text]\ncut = 1\n')
    p = load_profile(str(tmp_path / "more.toml"))
    assert p["train"]["epochs"] == 2 and p["text"]["cut"] == 1 and p["text"]["model"] == "bert-base-uncased"
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(PipelineError, match="circle"):
        load_profile(str(tmp_path / "a.toml"))


def test_a_child_profile_beats_its_parents_task_blocks(tmp_path):
    """Offline tunes every MiniLM layer (cut = 6, and again in [tasks.twitter17.text]); a profile that
    extends it and sets [text] cut gets its own cut for Twitter too, and its own task block wins over that."""
    from pipeline.config import Settings

    def cut(profile, task):
        return Settings(profile=profile, cache_dir=tmp_path / "c", task=task).section("text")["cut"]

    assert cut("offline", "twitter17") == 6 and cut("offline", "mnre") == 6
    assert cut("offline-levels", "twitter17") == 0 and cut("offline-levels", "mnre") == 0
    assert cut("paper", "twitter15") == 12 and cut("paper", "mnre") == 12
    (tmp_path / "one.toml").write_text('extends = "offline"\n[text]\ncut = 1\n')
    assert cut(str(tmp_path / "one.toml"), "twitter17") == 1
    (tmp_path / "own.toml").write_text('extends = "one.toml"\n[tasks.twitter17.text]\ncut = 3\n')
    assert cut(str(tmp_path / "own.toml"), "twitter17") == 3 and cut(str(tmp_path / "own.toml"), "twitter15") == 1
    tw = Settings(profile="offline", cache_dir=tmp_path / "c", task="twitter15").section("train")
    assert tw["head"] == "vecmner" and tw["heads"] == 4 and tw["epochs"] == 15
    links = {(p, t): Settings(profile=p, cache_dir=tmp_path / "c", task=t).section("text")["links"]
             for p in ("offline", "paper") for t in ("twitter15", "twitter17", "mnre")}
    assert {k for k, v in links.items() if v == "fold"} == {("offline", "twitter15"), ("paper", "twitter15")}
    # caption memory cached for MNRE; Twitter's NER data reads none, so its features keep their key
    mem = {(p, t): Settings(profile=p, cache_dir=tmp_path / "c", task=t).section("text").get("memory")
           for p in ("offline", "paper") for t in ("twitter15", "twitter17", "mnre")}
    assert {k for k, v in mem.items() if v} == {("offline", "mnre"), ("paper", "mnre")}
    # caption dropout: offline's choice on val; the paper has none
    drop = {p: Settings(profile=p, cache_dir=tmp_path / "c", task="mnre").section("train")["cap_drop"] for p in ("offline", "paper")}
    assert drop == {"offline": 0.5, "paper": 0.0}
