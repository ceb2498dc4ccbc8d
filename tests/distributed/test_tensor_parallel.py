"""Tensor parallelism (Megatron-style, TP = 2) x data parallelism (DP = 2) on 4 gloo ranks.

examples/megatron_tp.py's model under DeepSpeed with its ``mpu``: every VR optimizer, ZeRO 0 and 1,
gradient accumulation 1 and 2, clipping on, equals the unsharded model trained in one process by
the plain VR optimizer on the same per-micro-batch gradients (n = DP x accumulation samples; the
two tensor ranks of a replica see the same data and are one sample).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from ds_vrgd.optim import VR_OPTIMIZERS
from examples.megatron_tp import ParallelState, TensorParallelTokenModel, token_batch
from tests.support import REPO
from tests.support.launching import deepspeed_launch, rank_env, run_in_repo, spawn_results, succeeded

pytestmark = pytest.mark.slow

TP, DP, STEPS, LR = 2, 2, 3, 0.01
CASES = [dict(optimizer=o, stage=s, gas=g, clip=c) for o in VR_OPTIMIZERS for s in (0, 1) for g, c in ((1, 1.0), (2, 0.05))]
PARAMS = {"lr": LR, "gamma": 0.5}


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_env(rank, TP * DP, port)
    import deepspeed
    import torch.distributed as dist

    import ds_vrgd

    deepspeed.init_distributed(dist_backend="gloo")
    state = ParallelState(TP)
    results = []
    for case in CASES:
        model = TensorParallelTokenModel(state)
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": case["gas"],
                  "optimizer": {"type": case["optimizer"], "params": PARAMS},
                  "zero_optimization": {"stage": case["stage"]}, "gradient_clipping": case["clip"],
                  "steps_per_print": 10**9}
        engine, *_ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=state)
        for step in range(STEPS):
            for micro in range(case["gas"]):
                ids, target = token_batch(step, state.get_data_parallel_rank(), micro)
                engine.backward(F.mse_loss(engine(ids), target))
                engine.step()
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, {k: v.detach().clone() for k, v in model.state_dict().items()})
        results.append({"params": model.unsharded(shards[:TP]),  # data rank 0's tensor ranks 0 and 1
                        "replica_1": model.unsharded(shards[TP:]),
                        "stats": engine.vr_optimizer.gsnr_stats(), "comm": dict(engine.vr_optimizer._moments.comm)})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def reference(case: dict) -> dict:
    """The unsharded model, one process: DP x gas backward passes per step (loss / (DP x gas)), clipping, step."""
    from ds_vrgd import optim

    model = TensorParallelTokenModel()
    optimizer = getattr(optim, case["optimizer"])(model.parameters(), **PARAMS)
    for step in range(STEPS):
        for data_rank in range(DP):
            for micro in range(case["gas"]):
                ids, target = token_batch(step, data_rank, micro)
                (F.mse_loss(model(ids), target) / (DP * case["gas"])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        optimizer.step()
        optimizer.zero_grad()
    return {"params": {k: v.detach() for k, v in model.state_dict().items()}, "stats": optimizer.gsnr_stats()}


@pytest.fixture(scope="module")
def results():
    return dict(zip(map(id, CASES), spawn_results(_worker, TP * DP, lambda port, out_dir: (port, out_dir))))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['optimizer']}-zero{c['stage']}-gas{c['gas']}")
def test_tp2_dp2_matches_the_unsharded_reference(results, case):
    got, want = results[id(case)], reference(case)
    assert got["stats"]["n"] == want["stats"]["n"] == DP * case["gas"]
    for name, tensor in want["params"].items():
        torch.testing.assert_close(got["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got["replica_1"][name], got["params"][name], rtol=0, atol=0, msg=name)
    # exact per-layer statistics: the layer means of r over the unsharded layers
    assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=1e-3)


def test_the_example_under_the_deepspeed_launcher():
    """examples/megatron_tp.py as its docstring launches it: 4 ranks, TP 2 x DP 2, n = 2 x 2 accumulation."""
    import json

    stdout = succeeded(run_in_repo(deepspeed_launch(4, REPO / "examples" / "megatron_tp.py", "--deepspeed_config",
                                                    REPO / "ds_configs" / "cpu_tp2_zero1_vrlamb.json",
                                                    "--tensor-parallel", "2", "--steps", "20"), timeout=600))
    steps = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"step"')]
    assert len(steps) == 20 and all(s["n"] == 4 for s in steps)
    assert sum(s["loss"] for s in steps[-5:]) < sum(s["loss"] for s in steps[:5])
