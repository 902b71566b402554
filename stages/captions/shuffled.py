"""``MLLM=shuffled:<source>``: the content control of an imported caption source.

The captions of ``imported:<source>`` (the same files, the same names), each given to another
image: a random cyclic permutation of the file rows (Sattolo's algorithm, seeded), so no image keeps
its own caption, and each row's caption goes to exactly one other row.  The control has the source's captions,
lengths and vocabulary, and the head reads them through the same caption stream; only the link
between a caption and its image is gone.  So ``imported:qwen`` against ``shuffled:qwen`` asks
whether Qwen's captions help through what they say about the image, where ``imported:qwen``
against ``none`` also counts what a caption stream does with any text (regularisation, extra
parameters).  The report tests each source against its control when both are in it.
"""

from __future__ import annotations

import random
from pathlib import Path

from stages.data.readers import read_captions

from .imported import ImportedCaptioner

#: the permutation's seed; part of the cache key (a new seed is a new control)
SEED = 0


def cyclic_permutation(n: int, seed: int) -> list[int]:
    """``perm`` with ``perm[i] != i`` for every ``i`` when ``n > 1``: one random ``n``-cycle (Sattolo 1986)."""
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: never a fixed point
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class ShuffledCaptioner(ImportedCaptioner):
    backend = "shuffled"

    def key_config(self) -> dict:
        return {**super().key_config(), "backend": "shuffled", "permutation": "sattolo", "seed": SEED}

    def label(self) -> str:
        return f"shuffled:{Path(self.arg).name}"

    def setup(self) -> None:
        rows, self.skipped = [], []
        for f in self.files:
            got = read_captions(f, self.settings.on_error)
            self.skipped += got.skipped
            rows += [(row["img_id"], row["caption"]) for row in got.rows]
        perm = cyclic_permutation(len(rows), SEED)
        caps: dict[str, str] = {}
        for (img, _), j in zip(rows, perm):
            caps[img] = rows[j][1]
            caps.setdefault(img.rsplit(".", 1)[0], rows[j][1])  # JSON files key by stem
        self._captions = caps
