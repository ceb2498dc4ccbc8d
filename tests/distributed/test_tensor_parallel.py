"""Tensor parallelism (Megatron-style, TP = 2) x data parallelism (DP = 2) on 4 gloo ranks, and with pipeline
parallelism (TP 2 x PP 2, 3-D with DP 1).

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
CASES = [dict(optimizer=o, stage=s, gas=g, clip=c) for o in VR_OPTIMIZERS for s in (0, 1, 2) for g, c in ((1, 1.0), (2, 0.05))]
# Megatron-DeepSpeed's bf16 set-up: ZeRO 1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer), and its
# vr=false control (the wrapper's own half-precision error: tests/distributed/test_megatron_configs.py)
BF16 = {f"{o}{control}": dict(optimizer=o, stage=1, gas=2, clip=0.05, bf16=True, params={"vr": False} if control else {})
        for o in ("VRLAMB", "VRAdamW") for control in ("", "-control")}
PARAMS = {"lr": LR, "gamma": 0.5}


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_env(rank, TP * DP, port)
    import deepspeed
    import torch.distributed as dist

    import ds_vrgd

    deepspeed.init_distributed(dist_backend="gloo")
    state = ParallelState(TP)
    results = []
    for case in CASES + list(BF16.values()):
        model = TensorParallelTokenModel(state)
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": case["gas"],
                  "optimizer": {"type": case["optimizer"], "params": dict(PARAMS, **case.get("params", {}))},
                  "zero_optimization": {"stage": case["stage"]}, "gradient_clipping": case["clip"],
                  "steps_per_print": 10**9}
        if case.get("bf16"):
            config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
        engine, *_ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=state)
        for step in range(STEPS):
            for micro in range(case["gas"]):
                ids, target = token_batch(step, state.get_data_parallel_rank(), micro)
                output = engine(ids)
                engine.backward(F.mse_loss(output, target.to(output.dtype)))
                engine.step()
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, {k: v.detach().float().clone() for k, v in model.state_dict().items()})
        results.append({"params": model.unsharded(shards[:TP]),  # data rank 0's tensor ranks 0 and 1
                        "replica_1": model.unsharded(shards[TP:]),
                        "stats": engine.vr_optimizer.gsnr_stats(), "comm": dict(engine.vr_optimizer._moments.comm),
                        "wrapper": type(engine.optimizer).__name__})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def reference(case: dict) -> dict:
    """The unsharded model, one process: DP x gas backward passes per step (loss / (DP x gas)), clipping, step."""
    from ds_vrgd import optim

    model = TensorParallelTokenModel()
    optimizer = getattr(optim, case["optimizer"])(model.parameters(), **dict(PARAMS, **case.get("params", {})))
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
    cases = CASES + list(BF16.values())
    return dict(zip(map(id, cases), spawn_results(_worker, TP * DP, lambda port, out_dir: (port, out_dir))))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['optimizer']}-zero{c['stage']}-gas{c['gas']}")
def test_tp2_dp2_matches_the_unsharded_reference(results, case):
    got, want = results[id(case)], reference(case)
    assert got["stats"]["n"] == want["stats"]["n"] == DP * case["gas"]
    for name, tensor in want["params"].items():
        torch.testing.assert_close(got["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got["replica_1"][name], got["params"][name], rtol=0, atol=0, msg=name)
    # exact per-layer statistics: the layer means of r over the unsharded layers
    assert got["stats"]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=1e-3)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("name", [n for n in BF16 if not n.endswith("control")])
def test_tp2_dp2_bf16_with_fp32_accumulation_is_within_the_wrappers_own_error(results, name):
    got, control = results[id(BF16[name])], results[id(BF16[f"{name}-control"])]
    assert got["wrapper"] == "BF16_Optimizer" and got["stats"]["n"] == DP * BF16[name]["gas"]
    vr = _max_diff(got["params"], reference(BF16[name])["params"])
    own = _max_diff(control["params"], reference(BF16[f"{name}-control"])["params"])
    print(f"\n[TP2 x DP2 bf16 ZeRO-1 fp32 accumulation {name}] VR {vr:.2e}, vr=false control {own:.2e}")
    assert vr <= 2 * own + 1e-5
    assert _max_diff(got["replica_1"], got["params"]) == 0.0


def test_the_example_under_the_deepspeed_launcher():
    """examples/megatron_tp.py as its docstring launches it: 4 ranks, TP 2 x DP 2, n = 2 x 2 accumulation."""
    import json

    stdout = succeeded(run_in_repo(deepspeed_launch(4, REPO / "examples" / "megatron_tp.py", "--deepspeed_config",
                                                    REPO / "ds_configs" / "cpu_tp2_zero1_vrlamb.json",
                                                    "--tensor-parallel", "2", "--steps", "20"), timeout=600))
    steps = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"step"')]
    assert len(steps) == 20 and all(s["n"] == 4 for s in steps)
    assert sum(s["loss"] for s in steps[-5:]) < sum(s["loss"] for s in steps[:5])


# ---------------------------------------------------------------- 3-D: tensor x pipeline parallelism
PP3D, GAS3D = 2, 4
# ZeRO 0 without clipping, as in test_pipeline_parallel.py: DeepSpeed's ZeRO-0 pipeline clipping does not use
# the global gradient norm (independent of VRGD)
CASES_3D = [dict(optimizer=o, stage=s, gas=GAS3D, clip=0.05 if s else 0.0)
            for o in ("VRLAMB", "VRSGD", "VRAdamW") for s in (0, 1)]


def _worker_3d(rank: int, port: int, out_dir: str) -> None:
    """TP 2 x PP 2 (x DP 1) on 4 ranks: the example's embedding on stage 0, its MLP and head on stage 1, each
    split over the stage's two tensor ranks (consecutive ranks, as DeepSpeed's pipeline topology puts them)."""
    rank_env(rank, TP * PP3D, port)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    import ds_vrgd
    from examples.megatron_tp import TokenEmbedding, TokenMLPHead

    deepspeed.init_distributed(dist_backend="gloo")
    state = ParallelState(TP)  # its tensor groups [0, 1], [2, 3] are the stages' tensor-parallel groups
    results = []
    for case in CASES_3D:
        module = PipelineModule(layers=[TokenEmbedding(state), TokenMLPHead(state)], loss_fn=F.mse_loss,
                                topology=PipeModelDataParallelTopology(num_pp=PP3D, num_mp=TP, num_dp=1))
        config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": case["gas"],
                  "optimizer": {"type": case["optimizer"], "params": PARAMS},
                  "zero_optimization": {"stage": case["stage"]}, "gradient_clipping": case["clip"],
                  "steps_per_print": 10**9}
        engine, *_ = ds_vrgd.initialize(model=module, model_parameters=module.parameters(), config=config)
        for step in range(STEPS):
            engine.train_batch(iter([token_batch(step, 0, micro) for micro in range(case["gas"])]))
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, {k: v.detach().clone() for k, v in module.state_dict().items()})
        mine = {"stats": engine.vr_optimizer.gsnr_stats(), "stage": engine.stage_id,
                "tensor": state.get_tensor_model_parallel_rank()}
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        by_tensor_rank = [{k: v for r, s in enumerate(shards) if r % TP == t for k, v in s.items()} for t in range(TP)]
        results.append({"params": TensorParallelTokenModel().unsharded(by_tensor_rank), "ranks": every})
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def reference_3d(case: dict) -> dict:
    """The unsharded model, one process, the same gas micro-batches per step (one data-parallel rank)."""
    from ds_vrgd import optim

    model = TensorParallelTokenModel()
    optimizer = getattr(optim, case["optimizer"])(model.parameters(), **PARAMS)
    for step in range(STEPS):
        for micro in range(case["gas"]):
            ids, target = token_batch(step, 0, micro)
            (F.mse_loss(model(ids), target) / case["gas"]).backward()
        if case["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), case["clip"])
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def results_3d():
    return dict(zip(map(id, CASES_3D), spawn_results(_worker_3d, TP * PP3D, lambda port, out_dir: (port, out_dir))))


@pytest.mark.parametrize("case", CASES_3D, ids=lambda c: f"{c['optimizer']}-zero{c['stage']}")
def test_tp2_pp2_matches_the_unsharded_reference(results_3d, case):
    got = results_3d[id(case)]
    assert {(r["stage"], r["tensor"]) for r in got["ranks"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(r["stats"]["n"] == case["gas"] for r in got["ranks"])  # one data-parallel rank: n = micro-batches
    want = reference_3d(case)
    assert set(got["params"]) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got["params"][name], tensor, rtol=0, atol=1e-5, msg=name)
