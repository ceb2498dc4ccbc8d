"""DeepSpeed universal checkpoints of the VR optimizers: ``python -m ds_vrgd.universal`` and the load.

For ZeRO 1, 2 and 3 and three optimizers (VRLAMB with the GSNR EMA and ``gsnr_interval=3``: exp_avg,
exp_avg_sq, gsnr_q_ema, gsnr_rho; VRSGD with momentum: momentum_buffer, which DeepSpeed's converter cannot read;
VRAdamW: Adam's moments only), 2 ranks train 2 steps and save (between statistics steps 1 and 4, so the held rho
is in use at step 3 and the EMA advances at step 4), the checkpoint is converted, and 1 and 4 ranks resume with
``load_universal`` and train 3 more steps.

What is compared, and why it can fail:

* The resumed optimizer state, gathered per parameter over the ranks, equals the saved one element for element
  (``torch.equal``), with the same state names and step counts: conversion and load only move bits. The step
  counts after the continuation are checked too: DeepSpeed's ZeRO-3 loader gives all fp32 sub-groups one step
  tensor, which then advanced once per sub-group (11 instead of 5 on 1 rank with 3 sub-groups).
* The continued run equals the uninterrupted 2-rank run. The harness's micro-batches are indexed by
  (step, rank, micro-step), so a different world size would see other data; here the resumed ranks keep the
  global batch: with W ranks each takes 4 / W micro-steps, and global sample ``rank * (4 / W) + micro`` is the
  2-rank run's (rank, micro) = divmod(that, 2). Both runs then have the same 4 GSNR samples per step and the
  same mean gradient, summed in another order: equal to fp32 rounding. Weights to 1e-5 (as the other
  multi-rank tests at n = 4; measured: at most 6e-8), states to 1e-4 of their largest magnitude (the GSNR EMA,
  ~10, amplifies the rounding of near-zero variances; measured: 3e-6). The uninterrupted run itself equals the
  single-process reference (``ds_harness.reference``).
* That comparison would see lost state: the single-process reference with any one of the saved states dropped
  at the save point ends more than 100x the weight tolerance away (test_losing_any_state_would_show; measured:
  7e-3 to 3).

Also: DeepSpeed's own converter output is refused with the fix named where it lost VR state, and accepted
(state intact) where there was none to lose; a scalar state other than ``step`` is refused at conversion.
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.support.ds_harness import OPTIMIZER_PARAMS, ds_config, loss_of, make_model, micro_batch, reference
from tests.support.launching import rank_env, run_in_repo, spawn_results, succeeded

pytestmark = pytest.mark.slow

TOL, STATE_TOL = 1e-5, 1e-4
SAVED_WORLD, SAVED_GAS = 2, 2
SAMPLES = SAVED_WORLD * SAVED_GAS  # GSNR samples per step, in every world size
SAVED_STEPS, MORE_STEPS = range(2), range(2, 5)
OPTIMIZERS = {
    "lamb-ema-interval": dict(optimizer="VRLAMB", params={"gsnr_ema": 0.5, "gsnr_interval": 3}),
    "sgd-momentum": dict(optimizer="VRSGD", params={"momentum": 0.9}),
    "adamw": dict(optimizer="VRAdamW"),
}
CASES = {f"{name}-zero{stage}": dict(case, stage=stage, gas=SAVED_GAS) for stage in (1, 2, 3)
         for name, case in OPTIMIZERS.items()}
STATES = {"VRLAMB": {"exp_avg", "exp_avg_sq", "gsnr_q_ema", "gsnr_rho"}, "VRSGD": {"momentum_buffer"},
          "VRAdamW": {"exp_avg", "exp_avg_sq"}}
# DeepSpeed's own converter: loses the EMA and the held rho of VRLAMB (ZeRO 2 and 3); loses nothing of VRAdamW
DEEPSPEED_CONVERTED = ("lamb-ema-interval-zero2", "lamb-ema-interval-zero3", "adamw-zero2")
UNIVERSAL, DEEPSPEED_UNIVERSAL = "global_step2_universal", "global_step2_deepspeed_universal"


def _engine(case: dict, world: int, universal: bool):
    import ds_vrgd

    config = dict(ds_config(case), gradient_accumulation_steps=SAMPLES // world)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    model = make_model()
    engine, _, _, _ = ds_vrgd.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _train(engine, steps: range, rank: int, world: int) -> None:
    """Steps of the fixed global batch: this rank's micro-steps are the saved run's samples (module docstring)."""
    gas = SAMPLES // world
    for step in steps:
        for micro in range(gas):
            x, y = micro_batch(step, *divmod(rank * gas + micro, SAVED_GAS))
            engine.backward(loss_of(engine, x, y))
            engine.step()


def _full_state(engine) -> dict:
    """The fp32 weights and every optimizer state per whole parameter (gathered over the ranks: collective), and
    the distinct step counts of the VR optimizer's flat partitions."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.vr_optimizer
    keys = sorted({key for state in optimizer.state.values() for key in state} - {"step"})
    named = list(engine.module.named_parameters())
    return {
        "steps": sorted({float(state["step"]) for state in optimizer.state.values() if "step" in state}),
        "params": {name: safe_get_full_fp32_param(p).detach().clone() for name, p in named},
        "state": {name: {key: safe_get_full_optimizer_state(p, key).detach().clone() for key in keys}
                  for name, p in named},
    }


def _save_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    """Every case: train, save under root/<case>, record the state, then continue uninterrupted."""
    rank_env(rank, world, port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name, case in CASES.items():
        engine = _engine(case, world, universal=False)
        _train(engine, SAVED_STEPS, rank, world)
        engine.save_checkpoint(os.path.join(root, name))
        saved = _full_state(engine)
        _train(engine, MORE_STEPS, rank, world)
        results[name] = {"saved": saved, "straight": _full_state(engine)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def _resume_worker(rank: int, world: int, port: int, root: str, out_dir: str) -> None:
    """Every case: load the universal checkpoint, record the state, continue. On 1 rank also DeepSpeed's own
    conversions: the state, or the error of the load."""
    rank_env(rank, world, port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name, case in CASES.items():
        engine = _engine(case, world, universal=True)
        engine.load_checkpoint(os.path.join(root, name), tag=UNIVERSAL)
        loaded = _full_state(engine)
        _train(engine, MORE_STEPS, rank, world)
        results[name] = {"loaded": loaded, "continued": _full_state(engine)}
    for name in DEEPSPEED_CONVERTED if world == 1 else ():
        engine = _engine(CASES[name], world, universal=True)
        try:
            engine.load_checkpoint(os.path.join(root, name), tag=DEEPSPEED_UNIVERSAL)
            results[name]["deepspeed"] = {"loaded": _full_state(engine)}
        except ValueError as error:  # the message is what the test checks
            results[name]["deepspeed"] = {"error": str(error)}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    from ds_vrgd.deepspeed import shutdown
    shutdown()


def _convert(module: str, checkpoint: str, output: str):
    return run_in_repo([sys.executable, "-m", module, "--input_folder", os.path.join(checkpoint, "global_step2"),
                        "--output_folder", os.path.join(checkpoint, output), "--inject_missing_state"], timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Saved and uninterrupted (2 ranks), converted, resumed (1 and 4 ranks): {case: {...}} per world size."""
    root = str(tmp_path_factory.mktemp("universal"))
    saved = spawn_results(_save_worker, SAVED_WORLD, lambda port, out_dir: (SAVED_WORLD, port, root, out_dir))
    conversions = [("ds_vrgd.universal", name, UNIVERSAL) for name in CASES]
    conversions += [("deepspeed.checkpoint.ds_to_universal", name, DEEPSPEED_UNIVERSAL) for name in DEEPSPEED_CONVERTED]
    with ThreadPoolExecutor(2) as pool:  # two subprocesses at a time
        for done in pool.map(lambda c: _convert(c[0], os.path.join(root, c[1]), c[2]), conversions):
            succeeded(done)
    resumed = {world: spawn_results(_resume_worker, world, lambda port, out_dir: (world, port, root, out_dir))
               for world in (1, 4)}
    return {"root": root, "saved": saved, "resumed": resumed}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


@pytest.mark.parametrize("world", (1, 4))
@pytest.mark.parametrize("name", CASES)
def test_resumed_state_equals_the_saved_state(runs, name, world):
    saved, loaded = runs["saved"][name]["saved"], runs["resumed"][world][name]["loaded"]
    assert saved["steps"] == loaded["steps"] == [2.0]
    assert set(saved["state"]["0.weight"]) == STATES[CASES[name]["optimizer"]]
    for param, states in saved["state"].items():
        assert set(loaded["state"][param]) == set(states)
        for key, value in states.items():
            assert torch.equal(loaded["state"][param][key], value), (param, key)
        assert torch.equal(loaded["params"][param], saved["params"][param]), param


@pytest.mark.parametrize("world", (1, 4))
@pytest.mark.parametrize("name", CASES)
def test_resumed_run_continues_the_uninterrupted_run(runs, name, world):
    straight, continued = runs["saved"][name]["straight"], runs["resumed"][world][name]["continued"]
    assert continued["steps"] == straight["steps"] == [5.0]
    assert _max_diff(continued["params"], straight["params"]) < TOL
    for param, states in straight["state"].items():
        for key, value in states.items():
            assert (continued["state"][param][key] - value).abs().max() <= STATE_TOL * value.abs().max(), (param, key)


@pytest.mark.parametrize("name", CASES)
def test_uninterrupted_run_matches_the_single_process_reference(runs, name):
    case = dict(CASES[name], steps=len(SAVED_STEPS) + len(MORE_STEPS))
    want = reference(case, SAVED_WORLD)["params"]
    assert _max_diff(runs["saved"][name]["straight"]["params"], want) < TOL


def _reference_losing(case: dict, lost: str) -> dict:
    """ds_harness.reference's run with the state ``lost`` dropped from every parameter at the save point."""
    from ds_vrgd import optim

    model = make_model()
    options = dict(OPTIMIZER_PARAMS, **case.get("params", {}))
    optimizer = getattr(optim, case["optimizer"])(model.parameters(), **options)
    for step in (*SAVED_STEPS, *MORE_STEPS):
        if step == MORE_STEPS[0]:
            for state in optimizer.state.values():
                state.pop(lost, None)
        for rank in range(SAVED_WORLD):
            for micro in range(SAVED_GAS):
                (loss_of(model, *micro_batch(step, rank, micro)) / SAMPLES).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_losing_any_state_would_show(name, one_thread):
    """The continuation comparison can fail: without any one state the run ends > 100x TOL away."""
    case = dict(OPTIMIZERS[name], gas=SAVED_GAS, steps=len(SAVED_STEPS) + len(MORE_STEPS))
    want = reference(case, SAVED_WORLD)["params"]
    assert _max_diff(_reference_losing(case, "none"), want) == 0.0  # the loop is the reference's
    for lost in STATES[case["optimizer"]]:
        assert _max_diff(_reference_losing(case, lost), want) > 100 * TOL, lost


@pytest.mark.parametrize("name", DEEPSPEED_CONVERTED)
def test_deepspeed_converter_output_is_refused_where_it_lost_state(runs, name):
    got = runs["resumed"][1][name]["deepspeed"]
    if CASES[name]["optimizer"] == "VRAdamW":  # nothing beyond Adam's moments: accepted, and complete
        saved = runs["saved"][name]["saved"]["state"]
        assert all(torch.equal(got["loaded"]["state"][p][k], v) for p, s in saved.items() for k, v in s.items())
        return
    error = got["error"]
    assert "VRLAMB cannot resume from the universal checkpoint" in error
    assert "gsnr_q_ema (the GSNR EMA, gsnr_ema > 0)" in error and "gsnr_rho (the rho held" in error
    assert "exp_avg" not in error.split(" it lacks ")[1].split(". ")[0]  # DeepSpeed carries Adam's moments
    assert "python -m ds_vrgd.universal --input_folder" in error


def test_scalar_state_other_than_step_is_refused(runs, tmp_path):
    """A state that is neither per-element nor ``step`` cannot be cut per parameter: conversion fails naming it."""
    source = os.path.join(runs["root"], "adamw-zero2", "global_step2")
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(source, checkpoint / "global_step2")
    for path in (checkpoint / "global_step2").glob("*optim_states.pt"):
        sd = torch.load(path, weights_only=False)
        sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["lr_scale"] = 0.5
        torch.save(sd, path)
    done = _convert("ds_vrgd.universal", str(checkpoint), UNIVERSAL)
    assert done.returncode != 0
    assert "optimizer state 'lr_scale' of param group 0 is neither per-element" in done.stdout + done.stderr
