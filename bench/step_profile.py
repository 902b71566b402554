"""Where one training step of the shipped head goes: ``torch.profiler`` over ten real steps.

The head, its tuned top, the optimizer and the precision are the trainer's (the profile's
``[train]``); the batches are the first length-bucketed batches of an epoch of the real data.
Prints the step's median time without the profiler, the shares of the matmuls
(``mm``/``addmm``/``bmm``), of dtype casts (``copy_``/``_to_copy``) and of the rest, the
tuned top's matmul rate against the roofline measured in the same run, and the profiler's table.

Uses ``--source``/``MNRE_SOURCE``, ``PROFILE``, ``TASK``, ``BENCH_MLLM`` (default
``imported:qwen``) and ``BENCH_STEPS`` (default 10 profiled steps).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from bench._common import OthersLoad, cpu_name, roofline

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
CASTS = ("aten::copy_", "aten::_to_copy")


def main(settings=None, argv: list[str] | None = None) -> int:
    from bench.train_bench import _settings_from_env, top_flops, train_step, trainer_head
    from pipeline.config import Settings

    if not isinstance(settings, Settings):
        settings = _settings_from_env()
    from camim.graph import inputs_for
    from stages.train.trainer import amp_dtype, epoch_batches, load_data, pick_device, train_options

    mllm = os.environ.get("BENCH_MLLM", "imported:qwen")
    steps = int(os.environ.get("BENCH_STEPS", "10"))
    conf = train_options(settings, {})
    if int(conf["threads"]) > 0:
        torch.set_num_threads(int(conf["threads"]))
    data = load_data(settings, mllm, conf["head"], inputs_for(settings, mllm))
    device = pick_device(settings.device)
    amp = amp_dtype(str(conf["amp"]), device)
    torch.manual_seed(1)
    head, opt = trainer_head(data, conf, device)
    gen = torch.Generator().manual_seed(1)
    batches = epoch_batches(data.splits["train"], data.lengths, int(conf["batch_size"]), int(conf["bucket"]), gen)
    steps_per_epoch = len(batches)
    batches = batches * (1 + (3 + 3 * steps) // steps_per_epoch)  # a small sample: its batches again
    warm, timed, prof = batches[:3], batches[3 : 3 + 2 * steps], batches[3 + 2 * steps : 3 + 3 * steps]
    head.train()

    def step(rows):
        train_step(head, opt, {k: v.to(device) for k, v in data.batch(rows).items()}, amp, device)

    others = OthersLoad()
    print(others.quiet())
    roof = roofline(3)
    for r in warm:
        step(r)
    times = []
    for r in timed:
        t = time.perf_counter()
        step(r)
        times.append(time.perf_counter() - t)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for r in prof:
            step(r)
    ev = p.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL)
    casts = sum(e.self_cpu_time_total for e in ev if e.key in CASTS)
    print(f"step profile: head {conf['head']}, {mllm}, {data.dims.get('top_layers', 0)} tuned layers, {amp or 'fp32'}, "
          f"{torch.get_num_threads()} threads; cpu: {cpu_name()}")
    print(others.summary())
    print(f"step (no profiler), median of {len(times)} real batches: {statistics.median(times) * 1000:.1f} ms")
    print(f"under the profiler ({len(prof)} steps): matmuls {mm / total:.0%} ({mm / len(prof) / 1000:.0f} ms a step), "
          f"dtype casts {casts / total:.0%}, the rest {(total - mm - casts) / total:.0%}")
    if "top_layers" in data.dims:
        fl = top_flops(data, data.dims, conf.get("joint", True))
        per_step = fl["train"] / steps_per_epoch
        peak = roof["bf16" if amp == torch.bfloat16 else "fp32"]
        rate = per_step / (mm / len(prof) / 1e6) / 1e9  # GFLOP/s while in matmuls (mm: µs over the profiled steps)
        print(f"the tuned top's matmuls: {per_step / 1e9:.0f} GFLOP a training step -> {rate:.0f} "
              f"GFLOP/s while in matmuls, {rate / peak:.0%} of the roofline measured now ({peak:.0f} GFLOP/s)")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
