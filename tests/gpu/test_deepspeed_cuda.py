"""VR optimizers inside the real DeepSpeed engine on one CUDA GPU: ZeRO-2, ZeRO-3 and ZeRO-Offload, NCCL.

tests/distributed/test_deepspeed_zero*.py on the GPU: one spawned rank (DS_ACCELERATOR=cuda, NCCL, world 1)
trains every case of the module with a fresh engine over tests/support/ds_harness.py's MLP, with gradient
accumulation, so n = micro-steps x 1 rank. The bucket and its reductions are NCCL collectives on the GPU, and
ZeRO-3 overlaps its reductions on CUDA streams (on the CPU they are no-ops). Each run equals the single-process
reference (ds_harness.reference: the plain VR optimizer, one backward() per micro-batch) with the CPU tests'
bars: fp32 1e-5 (max parameter difference) and the mean GSNR within 1%; bf16 1e-2; fp16 2e-3. ZeRO-Offload
(offload_optimizer cpu, pin_memory) also equals the run without offload, and the VR sums (Σg², and Σg where
kept) live beside the host copy of the fp32 partition, in pinned memory where DeepSpeed pinned it.
"""

import os

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS
from tests.gpu.cuda import MARKS, one_rank, rank_env
from tests.support.ds_harness import ds_config, make_model, max_param_diff, reference, train_engine

pytestmark = MARKS

GAS = 4  # n = 4 samples: above the n = 2 cancellation the CPU tests loosen their bar for
TOL = 1e-5  # tests/distributed/test_deepspeed_zero.py
FP32 = [dict(optimizer=o, stage=s, gas=GAS, clip=0.02) for s in (2, 3) for o in VR_OPTIMIZERS]  # clipping active
LOW_PRECISION = {
    "bf16-zero2": dict(optimizer="VRLAMB", stage=2, gas=GAS, precision="bf16"),
    "bf16-zero3": dict(optimizer="VRLAMB", stage=3, gas=GAS, precision="bf16"),
    "fp16-zero2": dict(optimizer="VRAdamW", stage=2, gas=GAS, precision="fp16", steps=4),
    "fp16-zero3": dict(optimizer="VRAdamW", stage=3, gas=GAS, precision="fp16", steps=4),
}
OFFLOAD = {
    "zero2-VRLAMB": dict(optimizer="VRLAMB", stage=2, gas=GAS, clip=0.02, offload=True),
    "zero2-VRAdamW": dict(optimizer="VRAdamW", stage=2, gas=GAS, clip=0.02, offload=True),
    "zero3-VRLAMB": dict(optimizer="VRLAMB", stage=3, gas=GAS, clip=0.02, offload=True),
}
WRAPPER = {2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _name(case: dict) -> str:
    return f"{case['optimizer']}-zero{case['stage']}"


# ------------------------------------------------------------------ the spawned rank


def _engine(case: dict):
    """A fresh engine for a case: ds_harness's config, offload with pinned host memory."""
    import ds_vrgd

    config = ds_config(case)
    if case.get("offload"):
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    model = make_model()
    engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _result(engine, applied: list[int]) -> dict:
    """ds_harness's result (parameters moved to the CPU), and where the VR buffers lived: per owner (a tensor the
    VR optimizer steps) its device and pinning and those of its Σg² (Q) and Σg (S, where the source keeps one)."""
    import torch.distributed as dist

    from ds_vrgd.partitioned import PartitionedMoments
    from tests.support.ds_harness import _result as harness_result

    out = harness_result(engine, applied)
    out["params"] = {name: value.cpu() for name, value in out["params"].items()}
    source = engine.vr_optimizer._moments
    sq, sums = source._sq, getattr(source, "_sum", {})

    def where(buffer):
        return None if buffer is None else (buffer.device.type, buffer.is_pinned())

    out.update(
        backend=dist.get_backend(),
        source=type(source).__name__ if isinstance(source, PartitionedMoments) else "not PartitionedMoments",
        bucket_device=sorted({half.device.type for half in getattr(source, "_halves", [])}),
        owners=[dict(owner=where(owner), sq=where(sq.get(key)), sum=where(sums.get(key)))
                for key, owner in source._owners.items()],
        sq_numel=sum(b.numel() for b in sq.values()),
    )
    return out


def _worker(rank: int, port: int, cases: list[dict], out_dir: str, accelerator: str, backend: str) -> None:
    rank_env(port, accelerator)  # before DeepSpeed is imported: it picks the accelerator once
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import ds_vrgd

    assert get_accelerator().device_name() == accelerator, get_accelerator().device_name()
    deepspeed.init_distributed(dist_backend=backend)
    device = get_accelerator().current_device_name()
    results = []
    for case in cases:
        engine = _engine(case)
        results.append(_result(engine, train_engine(engine, case, 0, device=device)))
    torch.save(results, os.path.join(out_dir, "results.pt"))
    ds_vrgd.shutdown()


def run_cases(cases: list[dict], accelerator: str = "cuda", backend: str = "nccl") -> dict[int, dict]:
    """Every case in one spawned rank; results keyed by ``id(case)``."""
    results = one_rank(_worker, lambda port, out_dir: (port, cases, out_dir, accelerator, backend))
    return dict(zip(map(id, cases), results))


@pytest.fixture(scope="module")
def runs():
    return run_cases(FP32 + list(LOW_PRECISION.values()) + list(OFFLOAD.values()))


def _ran_on_the_gpu(got: dict, case: dict) -> None:
    assert got["backend"] == "nccl"
    assert got["wrapper"] == WRAPPER[case["stage"]]
    assert got["source"] == "PartitionedMoments"
    assert got["bucket_device"] == ["cuda"]  # the rows of g^2 (and g) and their collectives
    assert got["comm"]["collectives"] > 0  # NCCL collectives: on CUDA tensors only
    assert got["owners"] and all(o["sq"] is not None for o in got["owners"])


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", FP32, ids=_name)
def test_fp32_matches_single_process_reference(runs, case):
    got, want = runs[id(case)], reference(case, 1)
    _ran_on_the_gpu(got, case)
    assert all(o["owner"][0] == o["sq"][0] == "cuda" for o in got["owners"])
    assert got["stats"]["n"] == GAS == want["stats"]["n"]
    assert got["applied"] == list(range(case.get("steps", 3)))
    assert max_param_diff(got["params"], want["params"]) < TOL
    assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=1e-2)


@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_low_precision_matches_fp32_reference(runs, name):
    """bf16 as tests/distributed's bf16 tests (1e-2; the mean GSNR within 5% at ZeRO-2); fp16 with DeepSpeed's
    dynamic loss scale as its fp16 tests (every step applied, 2e-3, mean GSNR within 5%)."""
    case = LOW_PRECISION[name]
    got = runs[id(case)]
    _ran_on_the_gpu(got, case)
    assert all(o["sum"] is not None and o["sum"][0] == "cuda" for o in got["owners"]), "an fp32 Σg in low precision"
    assert got["stats"]["n"] == GAS
    want = reference(case, 1)
    if case["precision"] == "bf16":
        assert max_param_diff(got["params"], want["params"]) < 1e-2
        if case["stage"] == 2:
            assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=0.05)
    else:
        assert got["applied"] == list(range(case["steps"]))
        assert max_param_diff(got["params"], want["params"]) < 2e-3
        assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=0.05)


@pytest.mark.parametrize("name", list(OFFLOAD))
def test_offload_matches_reference_and_the_gpu_run(runs, name):
    """The VR step on the host copy of the fp32 partition, Σg² (and Σg) beside it, the partition's size, in
    pinned memory where DeepSpeed pinned the partition (ZeRO-2 with pin_memory does; ZeRO-3 keeps its host
    copy pageable, and the sums follow it)."""
    case = OFFLOAD[name]
    got = runs[id(case)]
    on_gpu = runs[id(next(c for c in FP32 if c == {k: v for k, v in case.items() if k != "offload"}))]
    _ran_on_the_gpu(got, case)
    assert got["stats"]["n"] == GAS
    assert max_param_diff(got["params"], reference(case, 1)["params"]) < TOL
    assert max_param_diff(got["params"], on_gpu["params"]) < TOL
    assert got["sq_numel"] == got["partition_numel"]
    for o in got["owners"]:
        buffers = [b for b in (o["sq"], o["sum"]) if b is not None]
        assert o["owner"][0] == "cpu" and all(device == "cpu" for device, _ in buffers), o
        if case["stage"] == 2:
            assert o["owner"][1], "DeepSpeed pins the ZeRO-2 host partition with pin_memory"
        assert all(pinned == o["owner"][1] for _, pinned in buffers), f"the sums are pinned as their owner: {o}"
