"""HF Trainer ``resume_from_checkpoint`` under ``accelerate launch --use_deepspeed`` with VRLAMB holding VR state
(``gsnr_ema`` 0.5: the EMA ``gsnr_q_ema``; ``gsnr_interval`` 3: the held ``gsnr_rho``), 2 CPU ranks, gradient
accumulation 2, ZeRO-2 and ZeRO-3: a run stopped after its checkpoint at step 4 and resumed in fresh processes
ends where the uninterrupted 8-step run does, exactly (same batches, weights, per-element optimizer state, lr
schedule, step counters, GSNR statistics and logs).

The run of tests/support/scripts/hf_resume.py: statistics steps 1, 4, 7 (rho held at 2-3, 5-6, 8), so the
resumed run starts on held steps that need the checkpoint's gsnr_rho and reaches a statistics step whose EMA
needs its gsnr_q_ema; it skips 8 micro-batches of epoch 0 and crosses into epoch 1.
"""

import json

import pytest
import torch

from ds_vrgd.gsnr import LOG_FIELDS
from tests.support import SCRIPTS
from tests.support.launching import accelerate_launch, run_in_repo, succeeded
from tests.support.scripts.hf_resume import ACCUMULATION, MICRO_BATCH, STEPS, STOP

pytestmark = pytest.mark.slow

SCRIPT = SCRIPTS / "hf_resume.py"
TOLERANCE = 1e-6  # absolute for tensors, also relative for logged numbers; CPU fp32: measured 0 everywhere
VR_STATE = ("gsnr_q_ema", "gsnr_rho")


def ds_config(stage: int) -> dict:
    zero = {"stage": stage, **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})}
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "VRLAMB", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto", "gamma": 0.1,
                                                   "gsnr_ema": 0.5, "gsnr_interval": 3}},
        "zero_optimization": zero,
    }


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def runs(request, tmp_path_factory) -> dict:
    """{run: [rank 0 result, rank 1 result]} for the full, interrupted and resumed runs at one ZeRO stage."""
    out = tmp_path_factory.mktemp(f"hf_resume_zero{request.param}")
    config = out / "ds_config.json"
    config.write_text(json.dumps(ds_config(request.param)))
    for phase in ("first", "resume"):
        succeeded(run_in_repo(accelerate_launch("--use_deepspeed", "--deepspeed_config_file", config,
                                                SCRIPT, out, phase)))
    return {run: [torch.load(out / f"{run}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
            for run in ("full", "interrupted", "resumed")}


def _max_difference(a: dict | list, b: dict | list) -> float:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return max((x.double() - y.double()).abs().max().item() for x, y in pairs)


def _logged(result: dict) -> dict[int, dict]:
    return {entry["step"]: entry for entry in result["log_history"] if "loss" in entry}


def test_resume_skips_the_trained_batches_and_continues_the_same_order(runs):
    for rank, (full, interrupted, resumed) in enumerate(zip(runs["full"], runs["interrupted"], runs["resumed"])):
        assert full["world_size"] == 2 and len(full["seen"]) == STEPS * ACCUMULATION
        assert interrupted["seen"] == full["seen"][:STOP * ACCUMULATION], f"rank {rank}: the runs' first steps"
        assert resumed["seen"] == full["seen"][STOP * ACCUMULATION:], (
            f"rank {rank}: after resume Trainer fed other micro-batches than the uninterrupted run "
            "(skip_first_batches / the seedable sampler's epoch)")
    assert not set(map(str, runs["full"][0]["seen"])) & set(map(str, runs["full"][1]["seen"]))  # ranks differ


def test_resumed_weights_and_optimizer_state_equal_the_uninterrupted_run(runs):
    for rank, (full, interrupted, resumed) in enumerate(zip(runs["full"], runs["interrupted"], runs["resumed"])):
        assert _max_difference(full["weights"], interrupted["weights"]) > 1e-4  # steps 5-8 moved the weights
        assert _max_difference(full["weights"], resumed["weights"]) <= TOLERANCE, f"rank {rank}: module weights"
        assert _max_difference(full["partitions"], resumed["partitions"]) <= TOLERANCE, \
            f"rank {rank}: fp32 master partitions"
        assert len(full["state"]) == len(resumed["state"]) >= 1
        for index, (want, got) in enumerate(zip(full["state"], resumed["state"])):
            assert sorted(got) == sorted(want) and set(VR_STATE) <= set(want), f"rank {rank} state {index}: keys"
            assert not torch.equal(want["gsnr_rho"], torch.ones_like(want["gsnr_rho"]))  # a real held rho
            assert want["gsnr_q_ema"].abs().sum() > 0
            for key, value in want.items():
                if torch.is_tensor(value):
                    difference = (value.double() - got[key].double()).abs().max().item()
                    assert difference <= TOLERANCE, f"rank {rank} state {index}: {key} differs by {difference}"
                else:
                    assert got[key] == value, f"rank {rank} state {index}: {key}"


def test_resumed_schedule_and_step_counters_equal_the_uninterrupted_run(runs):
    for full, resumed in zip(runs["full"], runs["resumed"]):
        assert full["global_step"] == resumed["global_step"] == STEPS
        assert full["scheduler"]["last_epoch"] == resumed["scheduler"]["last_epoch"] == STEPS
        assert resumed["scheduler"] == full["scheduler"] and resumed["group_lrs"] == full["group_lrs"]
        assert resumed["engine_steps"] == full["engine_steps"] == {
            "global_steps": STEPS, "global_samples": STEPS * MICRO_BATCH * ACCUMULATION * 2, "skipped_steps": 0}
        full_lrs = [entry["learning_rate"] for entry in _logged(full).values()]
        assert len(set(full_lrs)) > 2  # warm-up then linear decay: the position in the schedule matters
        assert [_logged(resumed)[step]["learning_rate"] for step in range(STOP + 1, STEPS + 1)] == full_lrs[STOP:]


def test_resumed_gsnr_statistics_and_logs_equal_the_uninterrupted_run(runs):
    for rank, (full, resumed) in enumerate(zip(runs["full"], runs["resumed"])):
        assert full["gsnr_stats"]["step"] == resumed["gsnr_stats"]["step"] == 7  # the last statistics step
        (want_stats, want_layers), (got_stats, got_layers) = (
            ({key: value for key, value in r["gsnr_stats"].items() if key != "layers"}, r["gsnr_stats"]["layers"])
            for r in (full, resumed))
        assert got_stats == pytest.approx(want_stats, rel=TOLERANCE, abs=TOLERANCE)
        assert sorted(got_layers) == sorted(want_layers) and len(want_layers) > 10
        for name, layer in want_layers.items():
            assert got_layers[name] == pytest.approx(layer, rel=TOLERANCE, abs=TOLERANCE), f"rank {rank}: {name}"
        want, got = _logged(full), _logged(resumed)
        assert sorted(got) == list(range(1, STEPS + 1))  # the checkpoint's log history, then steps 5-8
        for step in range(STOP + 1, STEPS + 1):
            keys = ("loss", "grad_norm", "learning_rate", *LOG_FIELDS)
            assert all(key in want[step] for key in keys)
            # steps 5-6 hold rho from step 4: their GSNR fields are step 4's, logged again by ds_vrgd.hf after resume
            differing = {key: (want[step][key], got[step].get(key)) for key in keys
                         if got[step].get(key) != pytest.approx(want[step][key], rel=TOLERANCE, abs=TOLERANCE)}
            assert not differing, f"rank {rank} step {step}: (uninterrupted, resumed) {differing}"
