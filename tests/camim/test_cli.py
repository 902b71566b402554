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
