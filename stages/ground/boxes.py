"""Box hygiene and crop cutting, shared by every grounding backend."""

from __future__ import annotations

import io
import math

from pipeline.hashing import sha256_bytes

CROP_SIZE = 224


def clean_boxes(cands: list[dict], width: int, height: int, m: int, min_side: float = 2.0, dedup_iou: float = 0.9) -> tuple[list[dict], int]:
    """Clamp candidate boxes to the image, drop degenerate and near-duplicate ones,
    and keep at most ``m``.

    ``cands``: dicts with ``box`` ``[x1, y1, x2, y2]`` (pixels), ``score`` and ``query``.
    Order: first the best box of each query (by score), so that each entity/phrase gets
    its own crop before any query gets a second one; then the rest by score.
    Returns (kept, number dropped as degenerate or duplicate).
    """
    clamped = []
    dropped = 0
    for c in cands:
        x1, y1, x2, y2 = (float(v) for v in c["box"])
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            dropped += 1
            continue
        x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
        y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
        if x2 - x1 < min_side or y2 - y1 < min_side:
            dropped += 1
            continue
        clamped.append({**c, "box": [x1, y1, x2, y2], "score": float(c.get("score", 0.0))})
    by_score = sorted(clamped, key=lambda c: -c["score"])
    firsts, rest, seen_q = [], [], set()
    for c in by_score:
        q = c.get("query")
        if q not in seen_q:
            seen_q.add(q)
            firsts.append(c)
        else:
            rest.append(c)
    kept: list[dict] = []
    for c in firsts + rest:
        if len(kept) >= m:
            break
        if any(iou(c["box"], k["box"]) > dedup_iou for k in kept):
            dropped += 1
            continue
        kept.append(c)
    return kept, dropped


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def cut(image, box, size: int = CROP_SIZE) -> tuple[bytes, str]:
    """The box region resized to ``size``x``size`` (bicubic) as PNG bytes, and their sha256."""
    from PIL import Image

    x1, y1, x2, y2 = box
    region = image.crop((int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2))))
    region = region.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    region.save(buf, format="PNG", optimize=False, compress_level=3)
    data = buf.getvalue()
    return data, sha256_bytes(data)
