"""``gsnr_interval`` across ranks (docs/design.md §2, "The statistics schedule"): under DDP and ZeRO 1/2/3 the
statistics steps equal the single-process reference and the steps between them send nothing and apply the
stored rho; a checkpoint taken between two statistics steps resumes exactly."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.support.costs_table import vr_bytes_per_element
from tests.support.ds_harness import loss_of, make_model, max_param_diff, micro_batch, reference, results_by_case
from tests.support.launching import rank_env, spawn_results

pytestmark = pytest.mark.slow

TOL = 1e-5
INTERVAL = {"gsnr_interval": 3}
STATISTICS = [True, False, False, True, False]  # steps 1..5
ZERO = {
    "zero1": dict(optimizer="VRLAMB", stage=1, gas=2, steps=5, clip=0.02, params=INTERVAL),
    "zero2": dict(optimizer="VRLAMB", stage=2, gas=2, steps=5, clip=0.02, params=INTERVAL),
    "zero3": dict(optimizer="VRLAMB", stage=3, gas=2, steps=5, clip=0.02, params=INTERVAL),
    "zero2-sgd-ema": dict(optimizer="VRSGD", stage=2, gas=2, steps=5, params=dict(INTERVAL, momentum=0.9, gsnr_ema=0.5)),
    "zero2-warmup": dict(optimizer="VRAdamW", stage=2, gas=2, steps=5, params={"gsnr_interval": 2, "gsnr_warmup_steps": 1}),
}
ROWS = {1: "local-fp32", 2: "raw-fp32", 3: "raw-fp32"}
RESUMED = {f"{name}-checkpoint": dict(ZERO[name], checkpoint=True, params=dict(INTERVAL, gsnr_ema=0.5))
           for name in ("zero1", "zero2", "zero3")}
STRAIGHT = {f"{name}-straight": dict(ZERO[name], params=dict(INTERVAL, gsnr_ema=0.5)) for name in ("zero1", "zero2", "zero3")}


@pytest.fixture(scope="module")
def zero():
    return results_by_case(2, [*ZERO.values(), *RESUMED.values(), *STRAIGHT.values()])


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_statistics_steps_match_the_reference_and_the_others_send_nothing(zero, name, small_model):
    case, got = ZERO[name], zero[id(ZERO[name])]
    assert max_param_diff(got["params"], reference(case, 2)["params"]) < TOL
    numel = sum(p.numel() for p in small_model.parameters())
    per_step = vr_bytes_per_element(ROWS[case["stage"]], case["gas"]) * numel
    interval, warmup = case["params"]["gsnr_interval"], case["params"].get("gsnr_warmup_steps", 0)
    due = [t > warmup and (t - warmup - 1) % interval == 0 for t in range(1, case["steps"] + 1)]
    assert got["comm_per_step"] == [per_step if d else vr_bytes_per_element("held", 2) for d in due]
    assert got["stats"]["step"] == max(t for t, d in enumerate(due, 1) if d)  # statistics of the last statistics step


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_between_statistics_steps_resumes_exactly(zero, stage):
    resumed, straight = zero[id(RESUMED[f"zero{stage}-checkpoint"])], zero[id(STRAIGHT[f"zero{stage}-straight"])]
    assert resumed["steps"] == straight["steps"] == 5
    assert max_param_diff(resumed["params"], straight["params"]) < 1e-6
    assert resumed["comm_per_step"] == straight["comm_per_step"]  # the schedule's position came back too


DDP_CASES = [
    dict(optimizer="VRLAMB", gas=2, clip=0.02, params={"gsnr_interval": 2}),
    dict(optimizer="VRSGD", gas=2, clip=0.0, dtype="bf16", params={"gsnr_interval": 2, "momentum": 0.9}),
]


def _ddp_worker(rank, world, port, out_dir):
    """DDP with enable_gsnr, 3 steps; counts the elements all-reduced per step (the comm hook's calls)."""
    rank_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ds_vrgd import ddp, optim
    from tests.support.ds_harness import OPTIMIZER_PARAMS

    counted = [0]
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counted[0] += tensor.numel()
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    results = []
    for case in DDP_CASES:
        dtype = torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32
        model = DDP(make_model().to(dtype))
        optimizer = getattr(optim, case["optimizer"])(model.parameters(), **dict(OPTIMIZER_PARAMS, **case["params"]))
        ddp.enable_gsnr(model, optimizer)
        per_step = []
        for step in range(3):
            counted[0] = 0
            for micro in range(case["gas"]):
                x, y = micro_batch(step, rank, micro)
                with model.no_sync() if micro < case["gas"] - 1 else torch.enable_grad():
                    (loss_of(model, x.to(dtype), y.to(dtype)) / case["gas"]).float().backward()
            per_step.append(counted[0])
            if case["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
            optimizer.step()
            optimizer.zero_grad()
        results.append({"params": {k: v.float() for k, v in model.module.state_dict().items()}, "per_step": per_step})
    dist.all_reduce = all_reduce
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs():
    return spawn_results(_ddp_worker, 2, lambda port, out_dir: (2, port, out_dir))


@pytest.mark.parametrize("index", range(len(DDP_CASES)), ids=["VRLAMB-fp32", "VRSGD-bf16"])
def test_ddp_statistics_steps_match_the_reference_and_the_others_reduce_the_gradient_only(ddp_runs, index, small_model):
    case, got = DDP_CASES[index], ddp_runs[index]
    tol = 2e-2 if case.get("dtype") == "bf16" else TOL
    assert max_param_diff(got["params"], reference(case, 2)["params"]) < tol
    numel = sum(p.numel() for p in small_model.parameters())
    channels = 2 if case.get("dtype") == "bf16" else 1  # Σg² (and Σg for bf16 gradients) with the gradient
    assert got["per_step"] == [(1 + channels) * numel, numel, (1 + channels) * numel]
