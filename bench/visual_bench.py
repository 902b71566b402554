"""Visual-side benchmark: the matmul roofline, ResNet50 img/s, a bert-base-sized text
encoder seq/s, the image-feature stage end to end, and bf16-vs-fp32 cosine.

Run: ``python bench/visual_bench.py [options]`` or ``camim bench --only visual_bench``
(options then come from ``VISUAL_BENCH_ARGS``, e.g. ``VISUAL_BENCH_ARGS=--quick``).  Options:
``--quick`` (fewer repeats), ``--threads N``, ``--batch N``, ``--no-compile`` (skip the
``torch.compile`` variants), ``--weights PATH`` (ResNet50 state dict for the cosine
check; default random init, since ImageNet weights cannot be fetched offline),
``--json PATH`` (write the numbers).

Every rate is the best of ``repeats`` timed runs after one warm-up; the roofline is
measured in the same run (before and after the models) so that the printed
fractions compare like with like on a shared machine.  FLOP counts: ResNet50 at
224² = 8.18 GFLOP/img, BERT-base at 128 tokens = 22.35 GFLOP/seq (2 FLOP per
multiply-add, attention matmuls included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESNET50_GFLOP = 8.18
BERT_BASE_GFLOP_128 = 22.35
REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "fixtures" / "photos"


from bench._common import OthersLoad, _best, bf16_skip_text, bf16_slow, cpu_name, roofline, roofline_text  # noqa: E402


def photo_files() -> list[Path]:
    return sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def resnet_plan(with_compile: bool, bf16: bool) -> list[tuple]:
    """(label, dtype, channels_last, BN fold, compile) of each ResNet50 variant; the one the image stage
    runs by default is labelled so (bf16 where the CPU has it natively, else fp32)."""
    fast = "bf16" if bf16 else "fp32"  # what the stage's compute_dtype = auto picks here
    plan = [
        ("fp32 NCHW (naive)", "fp32", False, False, False),
        ("fp32 channels_last + BN fold" + ("" if bf16 else " (default)"), "fp32", True, True, False),
    ]
    if bf16:
        plan += [("bf16 channels_last", "bf16", True, False, False),
                 ("bf16 channels_last + BN fold (default)", "bf16", True, True, False)]
    if with_compile:
        plan.append((f"{fast} channels_last + BN fold + compile (opt-in)", fast, True, True, True))
    return plan


def resnet_variants(batch: int, repeats: int, with_compile: bool, bf16: bool = True) -> list[dict]:
    """ResNet50 in each layout and precision; ``bf16 = False`` (a CPU without native bf16) times the fp32
    variants only, and the fp32 fast path is then the default (the image stage's ``auto`` picks fp32)."""
    import torch

    from stages.features import backbones
    from stages.features.image import prepare_model

    rows = []
    x8 = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    for label, dt, cl, fold, comp in resnet_plan(with_compile, bf16):
        torch.manual_seed(0)
        mod = backbones.create("resnet50", "none").load().module
        p = prepare_model(mod, "cpu", dt, cl, fold, comp)
        x = (x8.float() / 255).to(p.dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)

        def step():
            with torch.inference_mode():
                p.module(x)

        t0 = time.perf_counter()
        s = _best(step, repeats)
        rows.append({"what": f"ResNet50 {label}", "unit": "img/s", "rate": batch / s, "gflop": batch * RESNET50_GFLOP / s,
                     "dtype": dt, "setup_s": time.perf_counter() - t0 - s * repeats})
    return rows


def text_variants(batch: int, repeats: int, with_compile: bool, bf16: bool = True) -> list[dict]:
    """A bert-base-sized encoder in fp32 and with bf16 weights (the text stage's fast path); ``bf16 =
    False`` times fp32 only."""
    import torch
    from transformers import BertConfig, BertModel

    rows = []
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, 128))
    mask = torch.ones_like(ids)
    variants = [("fp32", torch.float32, False)]
    if bf16:
        variants.append(("bf16 weights (text stage fast path)", torch.bfloat16, False))
    if with_compile:
        variants.append(("bf16 weights + compile", torch.bfloat16, True) if bf16 else ("fp32 + compile", torch.float32, True))
    for label, dt, comp in variants:
        model = BertModel(BertConfig()).eval().to(dt)
        fwd = torch.compile(model) if comp else model

        def step():
            with torch.inference_mode():
                fwd(input_ids=ids, attention_mask=mask)

        s = _best(step, repeats)
        rows.append({"what": f"BERT-base seq128 {label}", "unit": "seq/s", "rate": batch / s, "gflop": batch * BERT_BASE_GFLOP_128 / s,
                     "dtype": "bf16" if dt == torch.bfloat16 else "fp32"})
    return rows


def stage_end_to_end(n: int, workers: int) -> list[dict]:
    """The real stage (decode + resize in DataLoader workers, model, fp16 store) on the
    six photos, each written n/6 times with distinct bytes so nothing dedups."""
    import tempfile

    from PIL import Image

    from pipeline.runner import run_stage
    from pipeline.store import Store
    from stages.features.image import ImageFeatureStage, image_item

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = photo_files()
        items = []
        for i in range(n):
            im = Image.open(src[i % len(src)]).convert("RGB")
            im.putpixel((0, 0), (i % 256, i // 256, 7))
            p = Path(tmp) / f"img{i}.jpg"
            im.save(p, quality=90)
            items.append(image_item(f"k{i}", str(p), "image"))
        for backbone, weights in (("resnet50", "none"), ("efficientnet-lite0", "packaged")):
            for w in (0, workers):
                st = ImageFeatureStage({"backbone": backbone, "weights": weights}, device="cpu", workers=w)
                st.pending = list(items)
                t = time.perf_counter()
                _, summ = run_stage(st, items, Store(Path(tmp) / f"c-{backbone}-{w}"), batch_size=32)
                s = time.perf_counter() - t
                rows.append({"what": f"stage {backbone} {st.compute_dtype}, {w} decode workers", "unit": "img/s", "rate": summ.done / s,
                             "gflop": summ.done * (RESNET50_GFLOP if backbone == "resnet50" else 0.80) / s, "dtype": st.compute_dtype})
    return rows


def cosines(weights: str) -> list[dict]:
    import torch

    from stages.features import backbones
    from stages.features.image import decode, prepare_model

    x8 = torch.stack([decode(str(p), 256, 224)[0] for p in photo_files()])
    out = []
    from pipeline.errors import PipelineError

    for name, w in (("resnet50", weights or "none"), ("efficientnet-lite0", "packaged")):
        bb = backbones.create(name, w)
        try:
            bb.identity()
        except PipelineError as exc:
            print(f"cosine check of {name} skipped: {exc}")
            continue
        mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
        std = torch.tensor(bb.std).view(1, 3, 1, 1)
        x = (x8.float() / 255 - mean) / std
        feats = {}
        for dt in ("fp32", "bf16"):
            torch.manual_seed(0)
            p = prepare_model(bb.load().module, "cpu", dt, True, True, False)
            with torch.inference_mode():
                feats[dt] = p.module(x.to(p.dtype).contiguous(memory_format=torch.channels_last))[-1].float().mean((2, 3))
        cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"], dim=1)
        out.append({"backbone": name, "weights": w, "min_cos": float(cos.min()), "mean_cos": float(cos.mean())})
    return out


def main(settings=None, argv: list[str] | None = None) -> int:
    """``camim bench`` calls ``main(settings)`` (full run); ``python bench/visual_bench.py ARGS`` passes argv."""
    ap = argparse.ArgumentParser(prog="visual_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (their compile takes 30-80 s)")
    ap.add_argument("--weights", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-stage", action="store_true")
    if argv is None and settings is not None:
        argv = os.environ.get("VISUAL_BENCH_ARGS", "").split()
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 4
    others = OthersLoad()
    print(f"visual bench on {cpu_name()}: torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(others.quiet(0 if args.quick else None))
    roof1 = roofline(repeats)
    print(f"roofline: {roofline_text(roof1)}")
    bf16 = not bf16_slow(roof1)
    if not bf16:
        print(f"bf16 models not timed (only the 6-photo cosine check runs in bf16): {bf16_skip_text(roof1)}")
    rows = resnet_variants(args.batch, repeats, not args.no_compile, bf16)
    rows += text_variants(args.batch, repeats, not args.no_compile, bf16)
    if not args.skip_stage:
        rows += stage_end_to_end(64 if args.quick else 128, workers=2)
    roof2 = roofline(repeats)
    print(f"roofline again after the models: {roofline_text(roof2)}")
    roof = {k: max(roof1[k], roof2[k]) for k in ("fp32", "bf16")}
    print()
    print(f"{'what':<58} {'rate':>12} {'GFLOP/s':>9} {'of fp32 roof':>13} {'of bf16 roof':>13}")
    for r in rows:
        r["frac_fp32"] = r["gflop"] / roof["fp32"]
        r["frac_bf16"] = r["gflop"] / roof["bf16"]
        of_bf16 = f"{r['frac_bf16']:>13.0%}" if bf16 else f"{'-':>13}"  # no fraction of a roofline 100x below the models
        print(f"{r['what']:<58} {r['rate']:>8.1f} {r['unit']:<5}{r['gflop']:>8.0f} {r['frac_fp32']:>12.0%} {of_bf16}")
    base = next(r for r in rows if r["what"].startswith("ResNet50 fp32 NCHW"))
    best_r = next(r for r in rows if "(default)" in r["what"])
    comp_r = next((r for r in rows if "(opt-in)" in r["what"]), None)
    bert32 = next(r for r in rows if r["what"].startswith("BERT-base seq128 fp32"))
    bert16 = next((r for r in rows if "text stage fast path" in r["what"]), None)
    print()
    fast = "bf16" if bf16 else "fp32"  # the roofline of the precision the default path runs in
    print(f"ResNet50 default fast path ({fast}): {best_r['rate']:.1f} img/s = {best_r['rate'] / base['rate']:.2f}x naive fp32; "
          f"{best_r['frac_' + fast]:.0%} of the {fast} roofline (goal 40%)")
    if comp_r:
        print(f"ResNet50 with torch.compile ([image] compile = true): {comp_r['rate']:.1f} img/s = "
              f"{comp_r['rate'] / base['rate']:.2f}x naive fp32; {comp_r['frac_' + fast]:.0%} of the {fast} roofline; "
              f"compile took {comp_r['setup_s']:.0f}s")
    if bert16:
        print(f"text encoder bf16: {bert16['rate']:.1f} seq/s = {bert16['rate'] / bert32['rate']:.2f}x fp32; "
              f"{bert16['frac_bf16']:.0%} of the bf16 roofline (goal 60%)")
    else:
        print(f"text encoder fp32 (the text stage's pick here): {bert32['rate']:.1f} seq/s; "
              f"{bert32['frac_fp32']:.0%} of the fp32 roofline")
    cos = cosines(args.weights)
    for c in cos:
        print(f"bf16 vs fp32 pooled features on the 6 photos, {c['backbone']} ({c['weights']}): "
              f"min cosine {c['min_cos']:.5f}, mean {c['mean_cos']:.5f} ({'ok' if c['min_cos'] >= 0.999 else 'below 0.999: auto uses fp32'})")
    load_end = others.since()
    print(f"{others.summary()}; on a shared machine absolute rates are noisy, the fractions less so")
    if args.json:
        Path(args.json).write_text(json.dumps({"roofline": roof, "rows": rows, "cosine": cos, "others_load": load_end}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(argv=sys.argv[1:]))
