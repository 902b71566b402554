"""The visual bench times bf16 models only where the CPU multiplies bf16 natively, and names the
variant the image stage runs by default in the precision it picks."""

from bench._common import bf16_skip_text, bf16_slow
from bench.visual_bench import resnet_plan


def test_bf16_slow_at_a_quarter_of_fp32():
    # an EPYC without AVX512-BF16: 0.9 against 164.6 GFLOP/s; one with it: 980 against 221
    assert bf16_slow({"fp32": 164.6, "bf16": 0.9})
    assert not bf16_slow({"fp32": 221.0, "bf16": 980.0})
    assert not bf16_slow({"fp32": 100.0, "bf16": 25.0})
    assert "0.9 GFLOP/s against 164.6 in fp32" in bf16_skip_text({"fp32": 164.6, "bf16": 0.9})


def test_resnet_plan_without_native_bf16_times_fp32_only():
    plan = resnet_plan(with_compile=True, bf16=False)
    assert {dt for _, dt, *_ in plan} == {"fp32"}
    defaults = [p for p in plan if p[0].endswith("(default)")]
    assert len(defaults) == 1 and defaults[0][1:] == ("fp32", True, True, False)
    assert plan[-1][1] == "fp32" and plan[-1][4] is True  # the opt-in compile in the stage's precision


def test_resnet_plan_with_native_bf16_keeps_the_bf16_default():
    plan = resnet_plan(with_compile=False, bf16=True)
    defaults = [p for p in plan if p[0].endswith("(default)")]
    assert len(defaults) == 1 and defaults[0][1] == "bf16"
    assert not any(p[4] for p in plan)  # no compile variant when it is off
