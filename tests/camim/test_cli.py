"""The CLI turns bad input into one clear line (file:line), never a traceback."""

import subprocess
import sys

CLI = [sys.executable, "-m", "camim.cli"]


def test_bad_line_is_reported_with_file_and_line(tmp_path, small_source):
    f = small_source / "mnre_val.txt"
    lines = f.read_text().splitlines()
    lines[4] = lines[4].replace("'relation': '", "'relation': 'X")
    f.write_text("\n".join(lines) + "\n")
    r = subprocess.run(CLI + ["data", "--source", str(small_source), "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{f}:5: unknown relation 'X" in r.stderr
    assert "Traceback" not in r.stderr
    skip = subprocess.run(CLI + ["data", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--on-error", "skip"],
                          capture_output=True, text=True)
    assert skip.returncode == 0, skip.stderr
    assert "skipped 1 bad line" in skip.stderr
    assert "val         7 samples" in skip.stdout


def test_unknown_backend_and_missing_source(tmp_path, small_source):
    r = subprocess.run(CLI + ["captions", "--source", str(small_source), "--cache-dir", str(tmp_path), "--mllm", "gpt9"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown caption backend 'gpt9'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(CLI + ["data", "--source", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = subprocess.run(CLI + ["captions", "--source", str(small_source), "--cache-dir", str(tmp_path), "--mllm", "imported:llava"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no imported captions named 'llava'" in r.stderr and "qwen" in r.stderr


def test_bad_seeds_are_one_line_naming_where_they_came_from(tmp_path, small_source):
    """A seed that is not a whole number, or one given twice (the same run counted twice would make up its
    spread and its test), stops the report before any run trains."""
    base = CLI + ["report", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--dry-run"]
    for seeds, said in (("1,x", "seed 'x' is not a whole number"), ("1,2,1", "seed 1 is given twice"), ("1.5", "seed '1.5' is not")):
        r = subprocess.run(base + ["--seeds", seeds], capture_output=True, text=True)
        assert r.returncode == 2 and f"--seeds/SEEDS: {said}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    ok = subprocess.run(base + ["--seeds", " 1, 2 "], capture_output=True, text=True)
    assert ok.returncode == 0 and "x 2 seed(s)" in ok.stdout, ok.stderr


def test_seed_list_checks_every_place_seeds_come_from():
    import pytest

    from pipeline.errors import PipelineError
    from stages.report import seed_list

    assert seed_list([1, 2, 3], "[train] seeds") == [1, 2, 3] and seed_list("4,5", "--seeds") == [4, 5]
    for bad, said in (([1, True], "True"), ([2.0], "2.0"), ([], "no seeds"), ([3, 3], "given twice")):
        with pytest.raises(PipelineError, match=f"\\[report\\] seeds: .*{said}"):
            seed_list(bad, "[report] seeds")


def test_a_report_name_that_is_a_path_stops_the_report_before_any_run_trains(tmp_path, small_source):
    r = subprocess.run(CLI + ["report", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--runs-dir",
                              str(tmp_path / "runs"), "--mllm", "none", "--seeds", "1", "--name", "../elsewhere"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "report name '../elsewhere'" in r.stderr and "--reports-dir" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_report_checks_heads_and_options(tmp_path, small_source):
    base = CLI + ["report", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--dry-run"]
    for extra, said in ((["--head", "remote,xyz"], "unknown head 'xyz'"), (["--opt", "lr=x"], "--opt lr = 'x': expected a number")):
        r = subprocess.run(base + extra, capture_output=True, text=True)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_with_several_sources_is_an_error_not_a_run_of_the_first(tmp_path, small_source):
    r = subprocess.run(CLI + ["train", "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--runs-dir",
                              str(tmp_path / "runs"), "--mllm", "none,imported:qwen"], capture_output=True, text=True)
    assert r.returncode == 2 and "takes one caption source, not 2" in r.stderr and "camim report" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
