"""Out-of-memory halves the batch and carries on (local and per item)."""

import pyarrow.parquet as pq
import torch

from pipeline.runner import run_stage
from pipeline.stage import Stage
from pipeline.store import ItemResult, Store


class Greedy(Stage):
    """Raises the CUDA OOM error type whenever a batch holds more than ``limit`` items,
    as a model does when activations outgrow the device."""

    name = "greedy"

    def __init__(self, limit):
        self.limit = limit
        self.seen = []

    def key_config(self):
        return {"limit": "n/a"}

    def run(self, batch):
        if len(batch) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        self.seen.append(len(batch))
        return [ItemResult(it["item_key"], row={"v": it["v"]}) for it in batch]


def test_oom_halves_the_batch_and_finishes(tmp_path):
    items = [{"item_key": f"k{i}", "v": i} for i in range(50)]
    stage = Greedy(limit=5)
    cache, summary = run_stage(stage, items, Store(tmp_path), batch_size=32)
    assert summary.done == 50 and summary.failed == 0
    assert max(stage.seen) <= 5 and stage.seen[0] == 4  # 32 → 16 → 8 → 4
    sizes = [pq.read_metadata(p).num_rows for p in cache.part_paths()]
    assert sum(sizes) == 50 and max(sizes) == 4
