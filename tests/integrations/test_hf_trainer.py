"""HF Trainer without DeepSpeed (one process; torch DDP under accelerate launch), the MLM example, misuse errors.

Real Trainer and real launchers in fresh processes on CPU; the DDP run must
equal the single-process reference built from the micro-batches each rank
recorded.
"""

import json
import math
import os
import sys

import pytest
import torch

from tests.support import REPO, SCRIPTS
from tests.support.ds_harness import make_model, max_param_diff
from tests.support.launching import accelerate_launch, run_in_repo, succeeded
from tests.support.scripts.hf_trainer_regression import ACCUMULATION, STEPS, reference

REGRESSION = SCRIPTS / "hf_trainer_regression.py"


def _ranks(out_dir, world: int) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]


def _check_against_reference(ranks: list[dict]) -> float:
    """The run equals the single-process reference from the same micro-batches; returns the max difference."""
    got, world = ranks[0], len(ranks)
    assert all(len(r["seen"]) == STEPS * ACCUMULATION for r in ranks)
    want = reference([r["seen"] for r in ranks])
    assert max_param_diff(got["params"], make_model().state_dict()) > 1e-3  # it trained
    difference = max_param_diff(got["params"], want["params"])
    assert difference < 1e-5
    logged = [entry for entry in got["log_history"] if "loss" in entry]
    assert len(logged) == STEPS and all(entry["gsnr_n"] == world * ACCUMULATION for entry in logged)
    assert logged[-1]["gsnr_mean"] == pytest.approx(want["stats"]["gsnr_mean"], rel=1e-4)
    assert logged[-1]["b_simple"] == pytest.approx(want["stats"]["b_simple"], rel=1e-4)
    return difference


def test_single_process_trainer_samples_are_accumulation_micro_batches(tmp_path):
    succeeded(run_in_repo([sys.executable, REGRESSION, tmp_path]))
    [got] = _ranks(tmp_path, 1)
    assert got["world_size"] == 1 and got["wrapped"] == "Regression"
    assert got["n"] == ACCUMULATION
    _check_against_reference([got])


@pytest.mark.slow
def test_trainer_on_ddp_under_accelerate_launch_matches_reference(tmp_path):
    # --multi_gpu picks accelerate's torchrun launcher; without GPUs the ranks run on CPU with gloo
    succeeded(run_in_repo(accelerate_launch("--multi_gpu", REGRESSION, tmp_path)))
    ranks = _ranks(tmp_path, 2)
    assert [(r["world_size"], r["wrapped"], r["n"]) for r in ranks] == [(2, "DistributedDataParallel", 4)] * 2
    for micro in range(STEPS * ACCUMULATION):  # the ranks trained on different examples
        assert not set(ranks[0]["seen"][micro]) & set(ranks[1]["seen"][micro])
    _check_against_reference(ranks)


def test_optimizer_choices_accepted_and_refused_with_the_fix(tmp_path, port):
    script = SCRIPTS / "hf_optimizer_choice.py"
    errors = json.loads(succeeded(run_in_repo([sys.executable, script, tmp_path, port])).splitlines()[-1])
    accepted = ["vr_class", "vr_object", "config_names_vr", "vr_class_under_deepspeed"]
    assert {name: errors[name] for name in accepted} == dict.fromkeys(accepted, "accepted")
    how = "name a VR type in the DeepSpeed config"
    assert errors["default_optimizer"].startswith("ds_vrgd.hf.add_gsnr: Trainer would build its default optimizer "
                                                  "(optim=adamw_torch_fused), not a VR one")
    assert how in errors["default_optimizer"] and "optimizer_cls_and_kwargs=(VRLAMB" in errors["default_optimizer"]
    assert "Trainer got optimizers=(AdamW(...), ...), not a ds_vrgd VR optimizer; " + how in errors["torch_optimizer"]
    assert "Trainer got optimizer_cls_and_kwargs=(SGD, ...), not a ds_vrgd VR optimizer" in errors["torch_optimizer_class"]
    both = "and the DeepSpeed config also names optimizer {}; Trainer would silently train with {}. Use one"
    assert "Trainer got optimizers=(VRLAMB(...), ...) " + both.format("'VRLAMB'", "'VRLAMB'") in \
        errors["vr_object_and_config_optimizer"]
    assert "Trainer got optimizer_cls_and_kwargs=(VRLAMB, ...) " + both.format("'AdamW'", "'AdamW'") in \
        errors["vr_class_and_config_optimizer"]
    assert "remove the ds_config's \"optimizer\" section" in errors["vr_class_and_config_optimizer"]
    assert "the DeepSpeed config names optimizer 'AdamW', not a VR type (VRSGD, VRAdam, VRAdamW, VRLARS, VRLAMB)" \
        in errors["config_names_non_vr"]
    assert "Trainer got optimizers=(VRLAMB(...), ...) under DeepSpeed, which drops it" in \
        errors["vr_object_under_deepspeed"]
    assert "pass optimizer_cls_and_kwargs=(VRLAMB, {...})" in errors["vr_object_under_deepspeed"]


def _tensorboard_scalars(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in log_dir.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags.update(events.Tags()["scalars"])
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["accelerate-deepspeed", "accelerate-ddp"])
def test_mlm_example_through_its_launch_script(tmp_path, port, mode):
    succeeded(run_in_repo(["bash", REPO / "launch" / "hf_trainer_mlm.sh", mode, "--output-dir", tmp_path,
                           "--max-steps", "4", "--max-bytes", "60000", "--per-device-batch-size", "2",
                           "--report-to", "tensorboard"], PORT=str(port), VRGD_VENV=sys.prefix))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["optimizer"] == "VRLAMB" and metrics["deepspeed"] == (mode == "accelerate-deepspeed")
    assert metrics["world_size"] == 2 and metrics["n"] == metrics["gsnr_n"] == 2 * 2  # ranks x grad-accum
    assert metrics["steps"] == 4 and metrics["b_simple"] > 0
    # 4 tiny steps: the losses are noise around ln(vocab); loss falling is checked in test_hf_deepspeed
    assert all(math.isfinite(loss) for loss in [*metrics["losses"], metrics["eval_loss"]])
    assert {"train/gsnr_mean", "train/gsnr_n", "train/b_simple", "train/loss"} <= _tensorboard_scalars(tmp_path)
