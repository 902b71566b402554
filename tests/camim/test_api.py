"""The Python API does what the README's notebook example says."""


def test_notebook_example_on_the_small_sample(tmp_path, small_source):
    import camim

    s = camim.settings(source=str(small_source), cache_dir=tmp_path / "cache", runs_dir=tmp_path / "runs",
                       reports_dir=tmp_path / "reports", train={"hidden": 16, "heads": 2})
    ds, caps, feats = camim.features(s, mllms=["none", "imported:qwen"])
    assert feats.summary.total > 0
    data = camim.load(s, "imported:qwen")
    assert data.sent_vec.shape == (40, 384) and data.dims["top_layers"] == 6  # the offline cut: every MiniLM layer
    df = camim.frame(s, "imported:qwen")
    assert len(df) == 40 and {"sample_id", "label", "caption", "sent_vec"} <= set(df.columns)
    run = camim.train(s, "imported:qwen", seed=1, epochs=1)
    assert 0.0 <= run.metrics["test"]["f1"] <= 1.0 and (run.dir / "metrics.json").exists()
    rep = camim.report(s, ["none", "imported:qwen"], seeds=[1], epochs=1)
    assert "p_value" in rep["rows"][1]["significance"] and rep["paths"]["tex"].exists()
