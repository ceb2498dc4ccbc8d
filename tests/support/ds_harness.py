"""Real multi-process DeepSpeed runs on CPU (gloo) and their single-process references.

A *case* is a dict: optimizer type, ZeRO stage, gradient accumulation,
precision, clipping, bucket size, steps. :func:`run_cases` spawns ``world``
ranks once, and each rank trains every case with a fresh engine; rank 0
returns the final parameters, GSNR statistics and communication counters.
:func:`reference` trains the same model single-process with the plain VR
optimizer, one ``backward()`` per (rank, micro-batch) sample, which is the
definition the distributed run must reproduce.
"""

from __future__ import annotations

import os

import torch

from tests.support.launching import rank_env, spawn_results

MICRO_BATCH = 4
LR = 0.01
OPTIMIZER_PARAMS = {"lr": LR, "gamma": 0.5}


def make_model() -> torch.nn.Module:
    """Odd sizes (layers split across partitions), 2-D weights, 1-D biases, LayerNorm."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 1)
    )


def micro_batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic micro-batch of (step, rank, micro-step)."""
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(MICRO_BATCH, 7, generator=generator), torch.randn(MICRO_BATCH, 1, generator=generator)


def loss_of(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def ds_config(case: dict) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": case.get("gas", 1),
        "optimizer": {"type": case["optimizer"],
                      "params": case.get("optimizer_params", dict(OPTIMIZER_PARAMS, **case.get("params", {})))},
        "zero_optimization": {
            "stage": case.get("stage", 2),
            "reduce_bucket_size": case.get("bucket", 50),
            "allgather_bucket_size": case.get("bucket", 50),
        },
        "gradient_clipping": case.get("clip", 1.0),
        "steps_per_print": 10**9,
    }
    if case.get("offload"):
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if case.get("offload_param"):
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if case.get("stage") == 3:  # several fp32 sub-groups, every parameter partitioned
        config["zero_optimization"].update(sub_group_size=case.get("sub_group_size", 60),
                                           stage3_param_persistence_threshold=0,
                                           stage3_gather_16bit_weights_on_model_save=True)
    if case.get("vrgd"):
        config["vrgd"] = case["vrgd"]
    if case.get("grad_accum"):
        config["data_types"] = {"grad_accum_dtype": case["grad_accum"]}
    if case.get("monitor_dir"):
        config["csv_monitor"] = {"enabled": True, "output_path": case["monitor_dir"], "job_name": "vrgd"}
    precision = case.get("precision", "fp32")
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": case.get("scale_power", 8), "loss_scale_window": 2,
                          "hysteresis": 1}
    return config


def train_engine(engine, case: dict, rank: int, first_step: int = 0, comm_per_step: list | None = None,
                 device=None) -> list[int]:
    """Train; return the steps the engine applied (fp16 overflow steps are skipped). ``comm_per_step``: gets
    the bytes the VR source sent in each step; ``device``: where the micro-batches go (default: stay)."""
    dtype = next(engine.module.parameters()).dtype
    comm = getattr(getattr(engine, "vr_optimizer", None), "_moments", None)
    applied = []
    for step in range(first_step, first_step + case.get("steps", 3)):
        before = comm.comm["bytes"] if comm is not None else 0
        for micro in range(case.get("gas", 1)):
            x, y = micro_batch(step, rank, micro)
            loss = loss_of(engine, x.to(device, dtype), y.to(device, dtype)).float()
            engine.backward(loss)
            engine.step()
        if engine._step_applied:
            applied.append(step)
        if comm_per_step is not None and comm is not None:
            comm_per_step.append(comm.comm["bytes"] - before)
    return applied


def _result(engine, applied: list[int], comm_per_step: list[int] = ()) -> dict:
    """What rank 0 returns of a case; a DeepSpeed optimizer (a control case) has no VR statistics or traffic."""
    import deepspeed

    params = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # ZeRO-3: the whole parameter (else a no-op)
            params[name] = param.detach().float().clone()
    common = {"applied": applied, "params": params, "wrapper": type(engine.optimizer).__name__,
              "skipped": engine.skipped_steps}
    optimizer = getattr(engine, "vr_optimizer", None)
    if optimizer is None:
        return common
    source = optimizer._moments
    return {
        **common,
        "stats": optimizer.gsnr_stats(),
        "comm": dict(source.comm),
        "comm_per_step": list(comm_per_step),
        "buffers": source.buffer_numel(),
        "partition_numel": source.owned_numel(),
        "steps": max((int(s["step"].item()) for s in optimizer.state.values() if "step" in s), default=0),
    }


def _worker(rank: int, world: int, port: int, cases: list[dict], out_dir: str, fp16_on_cpu: bool) -> None:
    rank_env(rank, world, port)
    import deepspeed
    from deepspeed.accelerator import get_accelerator


    if fp16_on_cpu:
        # DeepSpeed's CPU accelerator refuses fp16 although torch computes it on CPU;
        # allow it so the loss-scale path (unscale, overflow skip) runs for real here.
        get_accelerator().is_fp16_supported = lambda: True
    deepspeed.init_distributed(dist_backend="gloo")
    results = []
    for case in cases:
        engine, comm_per_step = _engine(case), []
        if case.get("checkpoint"):
            train_engine(engine, dict(case, steps=case["steps"] // 2), rank, comm_per_step=comm_per_step)
            engine.save_checkpoint(os.path.join(out_dir, "ckpt"), tag="half")
            engine = _engine(case)
            engine.load_checkpoint(os.path.join(out_dir, "ckpt"), tag="half")
            rest = dict(case, steps=case["steps"] - case["steps"] // 2)
            applied = list(range(case["steps"] // 2)) + train_engine(engine, rest, rank, case["steps"] // 2,
                                                                     comm_per_step)
        else:
            applied = train_engine(engine, case, rank, comm_per_step=comm_per_step)
        results.append(_result(engine, applied, comm_per_step))
        if case.get("export"):
            results[-1]["exported"] = _export(engine, os.path.join(out_dir, f"export{len(results)}"))
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def _export(engine, directory: str) -> dict:
    """The trained weights as users get them: DeepSpeed's zero_to_fp32 from a checkpoint, and
    ``save_16bit_model`` (gathered at ZeRO-3 with stage3_gather_16bit_weights_on_model_save)."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine.save_checkpoint(directory, tag="final")
    engine.save_16bit_model(os.path.join(directory, "16bit"))
    deepspeed.comm.barrier()
    fp32 = get_fp32_state_dict_from_zero_checkpoint(directory, tag="final")
    model16 = torch.load(os.path.join(directory, "16bit", "pytorch_model.bin"), weights_only=False)
    return {"zero_to_fp32": {k: v.float() for k, v in fp32.items()}, "16bit": {k: v.float() for k, v in model16.items()}}


def _engine(case: dict):
    """A fresh engine for a case: the model built under ``deepspeed.zero.Init`` with ``zero_init`` (as HF
    Trainer does at ZeRO-3), in two param groups (weights, biases) with ``two_groups``."""
    import deepspeed

    import ds_vrgd

    config = ds_config(case)
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=bool(case.get("zero_init"))):
        model = make_model()
    params = model.parameters()
    if case.get("two_groups"):
        named = list(model.named_parameters())
        params = [{"params": [p for n, p in named if n.endswith(suffix)]} for suffix in ("weight", "bias")]
    engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=params, config=config)
    return engine


def results_by_case(world: int, cases: list[dict], fp16_on_cpu: bool = False) -> dict[int, dict]:
    """:func:`run_cases` keyed by ``id(case)`` (module fixtures look results up by the case object)."""
    return dict(zip(map(id, cases), run_cases(world, cases, fp16_on_cpu)))


def run_cases(world: int, cases: list[dict], fp16_on_cpu: bool = False) -> list[dict]:
    """Train every case on ``world`` spawned gloo ranks; rank 0's results, one per case."""
    return spawn_results(_worker, world, lambda port, out_dir: (world, port, cases, out_dir, fp16_on_cpu))


def reference(case: dict, world: int, applied: list[int] | None = None) -> dict:
    """Single-process run from the same per-micro-batch gradients (plain VR optimizer).

    ``applied``: the steps to take (default all); others are skipped like an fp16 overflow step.
    """
    from ds_vrgd import optim

    model = make_model()
    params = dict(OPTIMIZER_PARAMS, **case.get("params", {}))
    optimizer = getattr(optim, case["optimizer"])(model.parameters(), **params)
    gas = case.get("gas", 1)
    for step in range(case.get("steps", 3)) if applied is None else applied:
        for rank in range(world):
            for micro in range(gas):
                x, y = micro_batch(step, rank, micro)
                (loss_of(model, x, y) / (world * gas)).backward()
        if case.get("clip", 1.0):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.get("clip", 1.0))
        optimizer.step()
        optimizer.zero_grad()
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "stats": optimizer.gsnr_stats()}


def max_param_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def _config_worker(rank: int, world: int, port: int, configs: list[dict], out_dir: str) -> None:
    """deepspeed.initialize on each raw config; record the optimizer type or the error message."""
    import warnings

    rank_env(rank, world, port)
    import deepspeed

    import ds_vrgd  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    outcomes = []
    for config in configs:
        model = make_model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
                train_engine(engine, {"steps": 1, "gas": config.get("gradient_accumulation_steps", 1)}, rank)
                outcome = {"type": type(engine.basic_optimizer).__name__}
            except Exception as error:  # the message is what the test checks
                outcome = {"error": f"{type(error).__name__}: {error}"}
        outcome["warnings"] = [str(w.message) for w in caught]
        outcomes.append(outcome)
    if rank == 0:
        torch.save(outcomes, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def initialize_configs(configs: list[dict], world: int = 1) -> list[dict]:
    """Outcome of deepspeed.initialize + one step for each raw ds_config (see _config_worker)."""
    return spawn_results(_config_worker, world, lambda port, out_dir: (world, port, configs, out_dir))
