"""API captioning throughput against the fake server (300 ms per request).

For concurrency 1, 4, 16 and 64, without and with a requests-per-minute limit, runs
the real captions stage (thread pool, limiter, retries, store commits) over enough
items for about ``--seconds`` of work and prints the achieved rate as a fraction of
the ideal ``min(concurrency / latency, rate limit)``.  Goal: >= 0.9.

    python bench/captions_bench.py [--latency 0.3] [--limit-rps 20] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTO = ROOT / "tests" / "fixtures" / "photos" / "horse.png"


class FakeServerProcess:
    """The fake server in its own process, so that its threads do not share the
    benchmark's interpreter lock (a real server never does)."""

    def __init__(self, latency: float):
        self.latency = latency

    def __enter__(self):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "stages.captions.fake_server", "--port", "0", "--latency",
                                      str(self.latency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "fake MLLM server: DashScope <url>  OpenAI <url>"
        self.openai_url = line.split("OpenAI", 1)[1].strip()
        return self

    def requests(self) -> int:
        import json
        import urllib.request

        with urllib.request.urlopen(self.openai_url.rsplit("/v1", 1)[0] + "/stats", timeout=10) as r:  # noqa: S310 - local
            return json.loads(r.read())["requests"]

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        return False


def run_one(srv, concurrency: int, rps: float, latency: float, seconds: float, cache: Path) -> dict:
    from pipeline.config import Settings, load_profile, merge
    from pipeline.runner import run_stage
    from pipeline.store import Store
    from stages.captions import CaptionStage, make_captioner

    ideal = concurrency / latency if not rps else min(concurrency / latency, rps)
    n = max(8, int(round(ideal * seconds)))
    conf = merge(load_profile("offline"), {"captions": {"openai": {
        "concurrency": concurrency, "rpm": rps * 60, "timeout": 30.0, "max_attempts": 3}}})
    s = Settings(conf=conf, cache_dir=cache, mllm="openai:bench", prompt="camim")
    cap = make_captioner("openai:bench", s)
    items = [{"item_key": f"bench-{concurrency}-{rps}-{i}", "img_id": PHOTO.name, "image_path": str(PHOTO),
              "prompt": cap.prompt.template} for i in range(n)]
    before = srv.requests()
    _, summary = run_stage(CaptionStage(cap), items, Store(cache), batch_size=cap.default_batch_size, desc="bench")
    assert summary.done == n, summary.line()
    assert srv.requests() - before == n
    rate = n / summary.seconds
    return {"concurrency": concurrency, "limit": rps or None, "items": n, "seconds": summary.seconds,
            "rate": rate, "ideal": ideal, "ratio": rate / ideal}


def main(argv=None) -> int:
    import logging

    ap = argparse.ArgumentParser(description="caption API throughput vs the fake server")
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--limit-rps", type=float, default=20.0, help="rate limit of the limited runs (requests/s)")
    ap.add_argument("--seconds", type=float, default=6.0, help="about this much work per run")
    ap.add_argument("--concurrency", default="1,4,16,64")
    a = ap.parse_args(argv)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    logging.getLogger("camim").setLevel(logging.WARNING)
    rows = []
    with FakeServerProcess(a.latency) as srv, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_BASE_URL"] = srv.openai_url
        run_one(srv, 4, 0.0, a.latency, 0.5, Path(tmp) / "warm")  # warm-up: imports, first connections
        for rps in (0.0, a.limit_rps):
            for c in (int(x) for x in a.concurrency.split(",")):
                rows.append(run_one(srv, c, rps, a.latency, a.seconds, Path(tmp) / "cache"))
    print(f"captions API throughput, fake server latency {a.latency * 1000:.0f} ms (machine shared: numbers are noisy)")
    print(f"{'concurrency':>11} {'limit/s':>8} {'items':>6} {'seconds':>8} {'achieved/s':>11} {'ideal/s':>8} {'ratio':>6}")
    for r in rows:
        lim = f"{r['limit']:.0f}" if r["limit"] else "none"
        print(f"{r['concurrency']:>11} {lim:>8} {r['items']:>6} {r['seconds']:>8.2f} {r['rate']:>11.1f} {r['ideal']:>8.1f} {r['ratio']:>6.2f}")
    worst = min(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.2f} (goal >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
