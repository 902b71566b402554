"""camim export: CAMIM formats that import back unchanged, and Parquet that HF datasets reads."""

from typer.testing import CliRunner

from camim.cli import app


def _cli(*args):
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def _captions_key(cache, source, mllm):
    from pipeline.config import Settings
    from stages.captions import CaptionStage, make_captioner

    return CaptionStage(make_captioner(mllm, Settings(cache_dir=cache, source=str(source)))).key


def test_export_then_import_round_trips(tmp_path, small_source):
    from camim import chain
    from pipeline.config import Settings

    cache, a, b = tmp_path / "c", tmp_path / "a", tmp_path / "b"
    base = ["--source", str(small_source), "--cache-dir", str(cache)]
    _cli("export", str(a), *base, "--mllm", "imported:qwen", "--name", "caps")
    assert sorted(p.name for p in a.iterdir()) == ["caps_test.txt", "caps_train.txt", "caps_val.txt"]
    _cli("export", str(b), *base, "--mllm", f"imported:{a}", "--name", "caps")  # export what was imported
    for p in a.iterdir():
        assert (b / p.name).read_bytes() == p.read_bytes()
    assert _captions_key(cache, small_source, f"imported:{a}") == _captions_key(cache, small_source, f"imported:{b}")
    s = Settings(cache_dir=cache, source=str(small_source))
    _, caps = chain.captions(s, ["imported:qwen", f"imported:{a}"])
    recs = chain.data(s).records.to_pylist()
    assert [caps[0].for_record(r) for r in recs] == [caps[1].for_record(r) for r in recs]
    _cli("export", str(tmp_path / "j"), *base, "--mllm", "imported:qwen", "--format", "json", "--name", "caps")
    assert _captions_key(cache, small_source, f"imported:{tmp_path / 'j'}")


def test_parquet_export_loads_with_hf_datasets(tmp_path, small_source):
    import datasets

    out = tmp_path / "pq"
    _cli("export", str(out), "--source", str(small_source), "--cache-dir", str(tmp_path / "c"), "--mllm", "imported:qwen",
         "--format", "parquet")
    ds = datasets.load_dataset("parquet", data_files={s: str(out / f"{s}.parquet") for s in ("train", "val", "test")},
                               cache_dir=str(tmp_path / "hf"))
    assert ds["train"].num_rows == 24 and ds["test"].num_rows == 8
    row = ds["train"][0]
    assert len(row["sent_vec"]) == 384 and row["label"] and row["tokens"] and isinstance(row["caption"], str)
    assert len(row["cap_vec"]) in (0, 384)
