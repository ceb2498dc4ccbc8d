"""What the VR source reduces per step, counted in every configuration, equals the documented table
(docs/costs.md, "Traffic per step, by configuration"; tests/support/costs_table.py reads it), and each fp32
and bf16 run still equals the single-process reference (fp16 against a control of the same wrapper:
tests/distributed/test_megatron_configs.py). 2 gloo ranks, the harness MLP, gradient accumulation 3."""

import pytest

from tests.support.costs_table import vr_values_per_element
from tests.support.ds_harness import max_param_diff, reference, results_by_case

pytestmark = pytest.mark.slow

GAS, STEPS = 3, 3
TOL = {"fp32": 1e-5, "bf16": 1e-2}


def _case(row: str, stage: int, precision: str = "fp32", wrapper: str = "", **extra) -> dict:
    return dict(row=row, optimizer="VRLAMB", stage=stage, gas=GAS, steps=STEPS, clip=0.02, precision=precision,
                wrapper=wrapper, **extra)


CASES = [
    _case("z0-fp32", 0, wrapper="VRLAMB"),
    _case("z0-half", 0, "bf16", "FP16_UnfusedOptimizer"),
    _case("z1-fp32", 1, wrapper="DeepSpeedZeroOptimizer"),
    _case("z1-half", 1, "bf16", "DeepSpeedZeroOptimizer"),
    _case("bf16-optimizer", 1, "bf16", "BF16_Optimizer", grad_accum="fp32"),
    _case("z23-fp32", 2, wrapper="DeepSpeedZeroOptimizer"),
    _case("z23-fp32", 3, wrapper="DeepSpeedZeroOptimizer_Stage3"),
    _case("z23-half", 2, "bf16", "DeepSpeedZeroOptimizer"),
    _case("z23-half", 3, "bf16", "DeepSpeedZeroOptimizer_Stage3"),
    _case("z23-fp32-local", 2, wrapper="DeepSpeedZeroOptimizer", vrgd={"local_sums": True}),
    _case("z23-fp32-local", 3, wrapper="DeepSpeedZeroOptimizer_Stage3", vrgd={"local_sums": True}),
    _case("z23-half-local", 2, "bf16", "DeepSpeedZeroOptimizer", vrgd={"local_sums": True}),
    _case("z23-fp32", 1, wrapper="DeepSpeedZeroOptimizer", vrgd={"local_sums": False}),  # opting out at ZeRO 1
    _case("z23-fp32", 2, wrapper="DeepSpeedZeroOptimizer", offload=True),
    _case("z23-fp32-local", 2, wrapper="DeepSpeedZeroOptimizer", offload=True, vrgd={"local_sums": True}),
]
FP16_CASES = [_case("z0-half", 0, "fp16", "FP16_UnfusedOptimizer"), _case("z1-half", 1, "fp16", "DeepSpeedZeroOptimizer")]


def _id(case: dict) -> str:
    local = {True: "-local", False: "-per-micro-step"}.get(case.get("vrgd", {}).get("local_sums"), "")
    offload = "-offload" if case.get("offload") else ""
    return f"{case['row']}:zero{case['stage']}-{case['precision']}{local}{offload}"


@pytest.fixture(scope="module")
def runs():
    return results_by_case(2, CASES)


@pytest.fixture(scope="module")
def fp16_runs():
    return results_by_case(2, FP16_CASES, fp16_on_cpu=True)


def _check(got: dict, case: dict, numel: int) -> None:
    assert got["wrapper"] == case["wrapper"]
    assert got["stats"]["n"] == 2 * GAS
    per_step = vr_values_per_element(case["row"], GAS) * numel
    assert got["comm_per_step"] == [per_step] * STEPS
    if case["precision"] in TOL:
        assert max_param_diff(got["params"], reference(case, 2)["params"]) < TOL[case["precision"]]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reduced_elements_per_step_are_the_documented_ones(runs, case, small_model):
    _check(runs[id(case)], case, sum(p.numel() for p in small_model.parameters()))


@pytest.mark.parametrize("case", FP16_CASES, ids=_id)
def test_fp16_reduced_elements_per_step_are_the_documented_ones(fp16_runs, case, small_model):
    got = fp16_runs[id(case)]
    assert len(got["applied"]) == STEPS, "no overflow at this loss scale (each step counts)"
    _check(got, case, sum(p.numel() for p in small_model.parameters()))


def test_local_sums_memory(runs, small_model):
    """Local sums: none at ZeRO 0 (Σg² itself holds them), one fp32 buffer per channel of the model's size
    where the gradient is partitioned; partition-sized Q (and S) everywhere."""
    numel = sum(p.numel() for p in small_model.parameters())
    by_id = {_id(case): runs[id(case)] for case in CASES}
    assert by_id["z0-fp32:zero0-fp32"]["buffers"]["local"] == 0
    assert by_id["z1-fp32:zero1-fp32"]["buffers"]["local"] == numel
    assert by_id["z1-half:zero1-bf16"]["buffers"]["local"] == 2 * numel
    assert by_id["z23-fp32:zero2-fp32"]["buffers"]["local"] == 0
    assert by_id["z23-fp32-local:zero3-fp32-local"]["buffers"]["local"] == numel
    for name, got in by_id.items():
        channels = 2 if "half" in name or "bf16-optimizer" in name else 1
        assert got["buffers"]["sq"] == channels * got["partition_numel"], name
