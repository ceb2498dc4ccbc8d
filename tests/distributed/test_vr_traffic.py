"""What the VR source sends per step, counted in every configuration, equals the documented table
(docs/costs.md, "Traffic per step, by configuration"; tests/support/costs_table.py reads it), and each fp32
and bf16 run still equals the single-process reference (fp16 against a control of the same wrapper:
tests/distributed/test_megatron_configs.py). 2 gloo ranks, the harness MLP, gradient accumulation 3."""

import pytest

from tests.support.costs_table import vr_bytes_per_element
from tests.support.ds_harness import max_param_diff, reference, results_by_case

pytestmark = pytest.mark.slow

STEPS = 3
TOL = {"fp32": 1e-5, "bf16": 1e-2}


def _case(row: str, stage: int, precision: str = "fp32", wrapper: str = "", gas: int = 3, **extra) -> dict:
    return dict(row=row, optimizer="VRLAMB", stage=stage, gas=gas, steps=STEPS, clip=0.02, precision=precision,
                wrapper=wrapper, **extra)


CASES = [
    _case("replicated-fp32", 0, wrapper="VRLAMB"),
    _case("replicated-half", 0, "bf16", "FP16_UnfusedOptimizer"),
    _case("local-fp32", 1, wrapper="DeepSpeedZeroOptimizer"),
    _case("local-half", 1, "bf16", "DeepSpeedZeroOptimizer", gas=5),  # 5 x 2 bytes > 8: the sums travel
    _case("raw-half", 1, "bf16", "DeepSpeedZeroOptimizer", gas=4),  # 4 x 2 bytes = 8: ties go to the samples
    _case("local-half", 1, "bf16", "BF16_Optimizer", gas=5, grad_accum="fp32"),
    _case("raw-half", 1, "bf16", "BF16_Optimizer", gas=2, grad_accum="fp32"),
    _case("raw-fp32", 2, wrapper="DeepSpeedZeroOptimizer"),
    _case("raw-fp32", 3, wrapper="DeepSpeedZeroOptimizer_Stage3"),
    _case("raw-half", 2, "bf16", "DeepSpeedZeroOptimizer"),
    _case("raw-half", 3, "bf16", "DeepSpeedZeroOptimizer_Stage3"),
    _case("local-fp32", 2, wrapper="DeepSpeedZeroOptimizer", vrgd={"local_sums": True}),
    _case("local-fp32", 3, wrapper="DeepSpeedZeroOptimizer_Stage3", vrgd={"local_sums": True}),
    _case("local-half", 2, "bf16", "DeepSpeedZeroOptimizer", vrgd={"local_sums": True}),
    _case("raw-fp32", 1, wrapper="DeepSpeedZeroOptimizer", vrgd={"local_sums": False}),  # opting out at ZeRO 1
    _case("local-half", 1, "bf16", "DeepSpeedZeroOptimizer", gas=2, vrgd={"local_sums": True}),  # opting in
    _case("raw-fp32", 2, wrapper="DeepSpeedZeroOptimizer", offload=True),
    _case("local-fp32", 2, wrapper="DeepSpeedZeroOptimizer", offload=True, vrgd={"local_sums": True}),
]
FP16_CASES = [_case("replicated-half", 0, "fp16", "FP16_UnfusedOptimizer"),
              _case("raw-half", 1, "fp16", "DeepSpeedZeroOptimizer"),
              _case("local-half", 1, "fp16", "DeepSpeedZeroOptimizer", gas=5)]


def _id(case: dict) -> str:
    local = {True: "-local", False: "-per-micro-step"}.get(case.get("vrgd", {}).get("local_sums"), "")
    offload = "-offload" if case.get("offload") else ""
    accumulation = "-fp32acc" if case.get("grad_accum") else ""
    return f"{case['row']}:zero{case['stage']}-{case['precision']}{accumulation}-gas{case['gas']}{local}{offload}"


@pytest.fixture(scope="module")
def runs():
    return results_by_case(2, CASES)


@pytest.fixture(scope="module")
def fp16_runs():
    return results_by_case(2, FP16_CASES, fp16_on_cpu=True)


def _check(got: dict, case: dict, numel: int) -> None:
    assert got["wrapper"] == case["wrapper"]
    assert got["stats"]["n"] == 2 * case["gas"]
    per_step = vr_bytes_per_element(case["row"], case["gas"]) * numel
    assert got["comm_per_step"] == [per_step] * STEPS
    if case["precision"] in TOL:
        assert max_param_diff(got["params"], reference(case, 2)["params"]) < TOL[case["precision"]]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bytes_sent_per_step_are_the_documented_ones(runs, case, small_model):
    _check(runs[id(case)], case, sum(p.numel() for p in small_model.parameters()))


@pytest.mark.parametrize("case", FP16_CASES, ids=_id)
def test_fp16_bytes_sent_per_step_are_the_documented_ones(fp16_runs, case, small_model):
    got = fp16_runs[id(case)]
    assert len(got["applied"]) == STEPS, "no overflow at this loss scale (each step counts)"
    _check(got, case, sum(p.numel() for p in small_model.parameters()))


def test_local_sums_memory(runs, small_model):
    """Local sums: none at ZeRO 0 (Σg² itself holds them), one fp32 buffer per sum of the model's size where
    they are partitioned (none with GA 1), none with raw samples; Σg² (and Σg where the mean needs it: also
    with raw samples) of the rank's partition everywhere."""
    numel = sum(p.numel() for p in small_model.parameters())
    for case in CASES:
        got = runs[id(case)]
        sums = 1 if case["row"].endswith("fp32") and not case["row"].startswith("raw") else 2
        assert got["buffers"]["sq"] == sums * got["partition_numel"], _id(case)
        local = 0 if case["row"].startswith(("replicated", "raw")) else sums * numel
        assert got["buffers"]["local"] == local, _id(case)
