"""``shuffled:<x>``, the content control: x's own captions, each given to another image."""

import zlib
from collections import Counter

import pytest

from pipeline.config import Settings, load_profile
from stages.captions.shuffled import cyclic_permutation


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_the_permutation_is_one_cycle_with_no_fixed_point(n):
    perm = cyclic_permutation(n, 0)
    assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    seen, i = set(), 0
    while i not in seen:  # one cycle through all n
        seen.add(i)
        i = perm[i]
    assert len(seen) == n
    assert perm == cyclic_permutation(n, 0) and (n < 4 or perm != cyclic_permutation(n, 1))


def test_every_image_gets_another_images_caption_and_every_caption_is_kept(tmp_path, small_source):
    from stages.captions import make_captioner

    s = Settings(conf=load_profile("offline"), cache_dir=tmp_path / "c", source=str(small_source))
    own, ctrl = make_captioner("imported:qwen", s), make_captioner("shuffled:qwen", s)
    own.setup()
    ctrl.setup()
    imgs = [k for k in own._captions if "." in k]  # full img ids (stems are aliases)
    assert len(imgs) > 10 and set(imgs) <= set(ctrl._captions)
    assert all(ctrl._captions[i] != own._captions[i] for i in imgs)  # nobody keeps their own (captions differ here)
    assert Counter(ctrl._captions[i] for i in imgs) == Counter(own._captions[i] for i in imgs)  # same captions, same lengths
    assert ctrl.key_config() != own.key_config() and ctrl.label() == "shuffled:qwen"
    assert ctrl.key_config()["files"] == own.key_config()["files"]  # the same files: a new file is a new control


def test_the_report_names_the_control_and_tests_each_source_against_it():
    from stages.report import content_rows
    from stages.report.tables import control_of, display

    assert display("shuffled:qwen") == "QwenVL-Plus, shuffled" and display("shuffled:/my/caps") == "/my/caps, shuffled"
    assert control_of("imported:qwen") == "shuffled:qwen" and control_of("none") is None and control_of("shuffled:qwen") is None
    sig = {"delta_f1": 0.012, "ci_low": -0.001, "ci_high": 0.025, "p_value": 0.07, "p_holm": 0.07, "significant": False,
           "enough_seeds": True, "se": 0.006, "mde": 0.02}
    head, body = content_rows([{"name": "QwenVL-Plus", "content": sig}, {"name": "none (text only)"}])
    assert head[1] == "ΔF1 vs shuffled" and body == [["QwenVL-Plus", "+1.20", "[-0.10, +2.50]", "0.070", "0.070", "no", "±2.00"]]
    assert content_rows([{"name": "none (text only)"}]) is None


def _runs(tmp_path, name, gold, accs, seed0=1):
    """Finished-run stand-ins: a predictions.parquet per seed, right on a share ``acc`` of the test items."""
    from types import SimpleNamespace

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for k, acc in enumerate(accs):
        rng = np.random.default_rng([zlib.crc32(name.encode()), k])
        pred = np.where(rng.random(len(gold)) < acc, gold, (gold + 1) % 4)
        d = tmp_path / f"{name}-{k}"
        d.mkdir()
        pq.write_table(pa.table({"split": ["test"] * len(gold), "index": list(range(len(gold))),
                                 "gold": gold.tolist(), "pred": pred.tolist()}), d / "predictions.parquet")
        out.append(SimpleNamespace(dir=d, metrics={"seed": seed0 + k}))
    return out


def test_a_source_is_tested_against_its_own_control_in_a_family_of_its_own(tmp_path):
    import numpy as np

    from stages.report import add_content_controls

    gold = np.random.default_rng(0).integers(0, 4, 3000)
    labels = ["None", "a", "b", "c"]
    runs = {"none": _runs(tmp_path, "none", gold, [0.7, 0.7, 0.7]),
            "imported:qwen": _runs(tmp_path, "qwen", gold, [0.8, 0.8, 0.8]),
            "shuffled:qwen": _runs(tmp_path, "shuf", gold, [0.7, 0.7, 0.7]),
            "imported:blip2": _runs(tmp_path, "blip", gold, [0.7, 0.7, 0.7])}  # no control in the report
    rows = [{"source": s} for s in runs]
    add_content_controls(rows, runs, labels, "cam")
    by = {r["source"]: r for r in rows}
    assert "content" not in by["none"] and "content" not in by["shuffled:qwen"] and "content" not in by["imported:blip2"]
    c = by["imported:qwen"]["content"]
    assert c["delta_f1"] > 0.05 and c["significant"] and c["family"] == 1 and c["n_seeds"] == 3
    assert c["rows"] == 4 and c["seed_df"] == 8  # the seeds' spread pooled over every row, as against none
