"""The DDP communication hook: 2 gloo ranks equal the single-process reference."""

import os

import pytest
import torch
import torch.distributed as dist

from tests.support.ds_harness import loss_of, make_model, max_param_diff, micro_batch, reference
from tests.support.launching import rank_env, spawn_results

pytestmark = pytest.mark.slow

CASES = [
    dict(optimizer="VRLAMB", gas=2, clip=0.02),
    dict(optimizer="VRSGD", gas=2, clip=0.0, params={"momentum": 0.9}),
    dict(optimizer="VRSGD", gas=1, clip=0.0, params={"momentum": 0.9, "gamma": 0.0}),
    dict(optimizer="VRAdamW", gas=3, clip=1.0),
    dict(optimizer="VRLARS", gas=2, clip=0.02, dtype="bf16"),
    dict(optimizer="VRAdamW", gas=3, clip=1.0, sync_every=True),  # accumulation without no_sync
]


def _worker(rank, world, port, out_dir):
    rank_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ds_vrgd import ddp, optim
    from tests.support.ds_harness import OPTIMIZER_PARAMS

    results = []
    for case in CASES:
        dtype = torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32
        model = DDP(make_model().to(dtype))
        optimizer = getattr(optim, case["optimizer"])(model.parameters(), **dict(OPTIMIZER_PARAMS, **case.get("params", {})))
        ddp.enable_gsnr(model, optimizer)
        for step in range(3):
            for micro in range(case["gas"]):
                x, y = micro_batch(step, rank, micro)
                last = micro == case["gas"] - 1 or case.get("sync_every")
                context = torch.enable_grad() if last else model.no_sync()
                with context:
                    (loss_of(model, x.to(dtype), y.to(dtype)) / case["gas"]).float().backward()
            if case["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
            optimizer.step()
            optimizer.zero_grad()
        results.append({"params": {k: v.float() for k, v in model.module.state_dict().items()},
                        "stats": optimizer.gsnr_stats()})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    return spawn_results(_worker, 2, lambda port, out_dir: (2, port, out_dir))


def _id(case):
    sync = "-sync_every" if case.get("sync_every") else ""
    return f"{case['optimizer']}-gas{case['gas']}-{case.get('dtype', 'fp32')}-gamma{case.get('params', {}).get('gamma', 0.5)}{sync}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_ddp_matches_single_process_reference(results, index):
    case, got = CASES[index], results[index]
    want = reference(case, 2)
    tol = 2e-2 if case.get("dtype") == "bf16" else 1e-5
    assert max_param_diff(got["params"], want["params"]) < tol
    if case.get("params", {}).get("gamma") == 0.0:
        return  # the base optimizer: no GSNR statistics
    rel = 0.1 if case.get("dtype") == "bf16" else 1e-2
    assert got["stats"]["n"] == want["stats"]["n"] == 2 * case["gas"]
    assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=rel)
