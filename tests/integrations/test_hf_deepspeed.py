"""HF Trainer with a ds_config naming VRLAMB ("auto" values), both ways users start it, 2 CPU ranks,
at ZeRO-2 and at ZeRO-3 (with and without offload; the model built inside deepspeed.zero.Init)."""

import json
import math

import pytest

from tests.support import REPO, SCRIPTS
from tests.support.launching import accelerate_launch, deepspeed_launch, run_in_repo, succeeded

pytestmark = pytest.mark.slow

SCRIPT = SCRIPTS / "hf_trainer_tiny.py"


def _check(result):
    assert result["optimizer"] == "VRLAMB" and result["world_size"] == 2
    assert result["n"] == 4  # 2 ranks x gradient_accumulation_steps 2
    assert result["betas"] == [0.9, 0.98] and result["weight_decay"] == 0.01  # "auto" filled by Trainer
    assert result["losses"][-1] < result["losses"][0]
    # ds_vrgd.hf.add_gsnr: every training log carries the step's GSNR statistics
    logged = result["gsnr_logs"]
    assert len(logged) == len(result["losses"]) == 8
    assert all(entry["gsnr_n"] == 4 for entry in logged)
    assert all(math.isfinite(entry["gsnr_mean"]) and entry["gsnr_mean"] > 0 for entry in logged)
    assert all(0 <= entry["gsnr_frac_low"] <= 1 and 0 <= entry["gsnr_frac_high"] <= 1 for entry in logged)
    assert all(entry["b_simple"] > 0 for entry in logged)
    assert logged[-1]["gsnr_mean"] == pytest.approx(result["last_gsnr_mean"])


def test_trainer_deepspeed_argument_under_deepspeed_launcher(tmp_path):
    out = tmp_path / "result.json"
    succeeded(run_in_repo(deepspeed_launch(2, SCRIPT, out, "--via-args")))
    _check(json.loads(out.read_text()))


@pytest.mark.parametrize("config", ["hf_auto_zero2_vrlamb.json", "hf_auto_zero3_vrlamb.json",
                                    "hf_auto_zero3_offload_vrlamb.json"])
def test_trainer_under_accelerate_launch_with_deepspeed_config_file(tmp_path, config):
    out = tmp_path / "result.json"
    succeeded(run_in_repo(accelerate_launch("--use_deepspeed", "--deepspeed_config_file", REPO / "ds_configs" / config,
                                            SCRIPT, out)))
    _check(json.loads(out.read_text()))
