"""Pipeline parallelism (DeepSpeed PipelineModule, PP = 2) x data parallelism (DP = 2) on 4 gloo ranks.

The harness model split over two stages: each stage's VR optimizer sees its own layers and the
samples of its data-parallel group (n = DP x micro-batches per train_batch). Every optimizer,
ZeRO 0 and 1, 1 and 2 micro-batches, clipping on at ZeRO 1, equals the single-process reference
(tests/support/ds_harness.reference: the same per-micro-batch gradients, the unsplit model). bf16,
the usual precision of pipelines, runs under DeepSpeed's BF16_Optimizer (at ZeRO 0 with bf16
accumulation, at ZeRO 1 with fp32 accumulation): within twice the difference of the same run with
``"vr": false`` (the wrapper's own half precision; tests/distributed/test_megatron_configs.py).
"""

import os

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS
from tests.support.ds_harness import OPTIMIZER_PARAMS, MICRO_BATCH, make_model, max_param_diff, micro_batch, reference
from tests.support.launching import rank_env, spawn_results

pytestmark = pytest.mark.slow

PP, DP, STEPS = 2, 2, 3
# ZeRO 0 without clipping: DeepSpeed's own ZeRO-0 pipeline clipping does not use the global gradient norm
# (with vr=False, i.e. plain SGD, it differs from clip_grad_norm_ of the whole model by 2e-3 here)
CASES = [dict(optimizer=o, stage=s, gas=g, clip=c if s else 0.0)
         for o in VR_OPTIMIZERS for s in (0, 1) for g, c in ((1, 1.0), (2, 0.02))]
BF16 = {f"{o}-zero{s}{control}": dict(optimizer=o, stage=s, gas=2, clip=0.0, precision="bf16",
                                     grad_accum="fp32" if s else None, params={"vr": False} if control else {})
        for o in ("VRLAMB", "VRSGD") for s in (0, 1) for control in ("", "-control")}


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean()


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_env(rank, PP * DP, port)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    import ds_vrgd

    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for case in CASES + list(BF16.values()):
        module = PipelineModule(layers=list(make_model()), num_stages=PP, loss_fn=_mse, partition_method="uniform")
        config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": case["gas"],
                  "optimizer": {"type": case["optimizer"], "params": dict(OPTIMIZER_PARAMS, **case.get("params", {}))},
                  "zero_optimization": {"stage": case["stage"]}, "gradient_clipping": case["clip"],
                  "steps_per_print": 10**9}
        dtype = torch.float32
        if case.get("precision") == "bf16":
            config["bf16"], dtype = {"enabled": True}, torch.bfloat16
        if case.get("grad_accum"):
            config["data_types"] = {"grad_accum_dtype": case["grad_accum"]}
        engine, *_ = ds_vrgd.initialize(model=module, model_parameters=module.parameters(), config=config)
        data_rank = engine.grid.data_parallel_id
        for step in range(STEPS):
            engine.train_batch(iter([tuple(t.to(dtype) for t in micro_batch(step, data_rank, micro))
                                     for micro in range(case["gas"])]))
        states: list = [None] * dist.get_world_size()
        mine = {"stage": engine.stage_id, "data": data_rank, "n": engine.vr_optimizer.gsnr_stats().get("n"),
                "wrapper": type(engine.optimizer).__name__,
                "params": {k: v.detach().float().clone() for k, v in module.state_dict().items()}}
        dist.all_gather_object(states, mine)
        results.append(states)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


@pytest.fixture(scope="module")
def results():
    cases = CASES + list(BF16.values())
    return dict(zip(map(id, cases), spawn_results(_worker, PP * DP, lambda port, out_dir: (port, out_dir))))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['optimizer']}-zero{c['stage']}-gas{c['gas']}")
def test_pp2_dp2_matches_the_single_process_reference(results, small_model, case):
    states = results[id(case)]
    assert {s["stage"] for s in states} == {0, 1} and {s["data"] for s in states} == {0, 1}
    assert all(s["n"] == DP * case["gas"] for s in states)  # per stage: its data-parallel samples only
    replicas = [{k: v for s in states if s["data"] == d for k, v in s["params"].items()} for d in (0, 1)]
    assert set(replicas[0]) == set(small_model.state_dict())  # the two stages hold the whole model
    want = reference(dict(case, steps=STEPS), DP)
    assert max_param_diff(replicas[0], want["params"]) < 1e-5
    assert max_param_diff(replicas[1], replicas[0]) == 0.0


def _replica(states: list, data: int) -> dict:
    return {k: v for s in states if s["data"] == data for k, v in s["params"].items()}


@pytest.mark.parametrize("name", [n for n in BF16 if not n.endswith("control")])
def test_bf16_pipeline_runs_under_the_bf16_optimizer_within_its_own_error(results, name):
    states, control = results[id(BF16[name])], results[id(BF16[f"{name}-control"])]
    assert {s["wrapper"] for s in states} == {"BF16_Optimizer"}
    assert all(s["n"] == DP * BF16[name]["gas"] for s in states)
    want = reference(dict(BF16[name], steps=STEPS), DP)["params"]
    without_vr = reference(dict(BF16[f"{name}-control"], steps=STEPS), DP)["params"]
    vr, own = max_param_diff(_replica(states, 0), want), max_param_diff(_replica(control, 0), without_vr)
    print(f"\n[PP2 x DP2 bf16 {name}] VR {vr:.2e}, vr=false control {own:.2e}")
    assert vr <= 2 * own + 1e-5
    assert max_param_diff(_replica(states, 1), _replica(states, 0)) == 0.0
