"""The NER dataset through the shared trainer: batches, decoding, metrics, run folder."""

import pyarrow.parquet as pq
import torch

from pipeline.config import Settings
from stages.data.twitter import TAGS


def small_twitter(tmp_path, n=(16, 6, 6)):
    from stages.data.twitter import TwitterTask

    src = TwitterTask().source_dir(Settings(task="twitter17"))
    dst = tmp_path / "tw"
    dst.mkdir()
    for name, k in zip(("train.txt", "valid.txt", "test.txt"), n):
        blocks = (src / name).read_text(encoding="utf-8").split("\n\n")[:k]
        (dst / name).write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return dst


def test_ner_data_batches_and_trainer_run(tmp_path, monkeypatch):
    from camim.graph import inputs_for
    from stages.train.ner import build_ner_data
    from stages.train.trainer import train_one

    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    s = Settings(task="twitter17", source=str(small_twitter(tmp_path)), cache_dir=tmp_path / "c", mllm="none")
    data = build_ner_data(s, "none", inputs_for(s, "none"))
    # the offline profile tunes every MiniLM layer for Twitter ([tasks.twitter17.text] cut = 6)
    assert data.dims == {"sent_word": 384, "text_levels": 1, "top_layers": 6, "top_heads": 12, "top_ffn": 1536, "top_eps": 1e-12}
    rows = data.splits["train"][:4]
    b = data.batch(rows)
    recs = [data.records[i] for i in rows.tolist()]
    W = max(len(r["tokens"]) for r in recs)
    assert b["first"].shape == b["label"].shape == b["first_mask"].shape == (4, W)
    for j, r in enumerate(recs):
        n = len(r["tokens"])
        assert b["first_mask"][j].sum() == n and b["label"][j, :n].tolist() == r["tag_ids"]
        assert (b["label"][j, n:] == -100).all()
        assert (b["first"][j, 1:n] > b["first"][j, : n - 1]).all() and b["first"][j, 0] == 1
        assert b["first"][j, n - 1] < b["sent_mask"][j].sum() - 1  # before [SEP]
    # decode pads every record to its own word count
    fake = torch.randint(0, 9, (4, W))
    dec = data.decode(b, fake)
    assert [len(d) for d in dec] == [len(r["tokens"]) for r in recs]

    res = train_one(s, "none", 1, {"head": "vecmner", "epochs": 2, "d": 32, "heads": 2, "n_cadf": 1}, data=data)
    m = res.metrics
    assert set(m["test"]) >= {"precision", "recall", "f1", "per_type"} and 0.0 <= m["test"]["f1"] <= 1.0
    pred = pq.read_table(res.dir / "predictions.parquet").to_pylist()
    test_recs = [data.records[i] for i in data.splits["test"].tolist()]
    got = [p for p in pred if p["split"] == "test"]
    assert [p["gold_label"].split(" ") for p in got] == [r["tags"] for r in test_recs]
    assert all(len(p["pred_label"].split(" ")) == len(r["tokens"]) and set(p["pred_label"].split(" ")) <= set(TAGS)
               for p, r in zip(got, test_recs))
