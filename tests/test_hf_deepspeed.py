"""HF Trainer with a ds_config naming VRLAMB ("auto" values), both ways users start it, 2 CPU ranks."""

import json
import os
import subprocess
import sys

import pytest

from tests.ds_harness import _free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "scripts", "hf_trainer_tiny.py")
BIN = os.path.dirname(sys.executable)


def _run(command, out):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _check(result):
    assert result["optimizer"] == "VRLAMB" and result["world_size"] == 2
    assert result["n"] == 4  # 2 ranks x gradient_accumulation_steps 2
    assert result["betas"] == [0.9, 0.98] and result["weight_decay"] == 0.01  # "auto" filled by Trainer
    assert result["losses"][-1] < result["losses"][0]


def test_trainer_deepspeed_argument_under_deepspeed_launcher(tmp_path):
    out = tmp_path / "result.json"
    command = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), SCRIPT, str(out), "--via-args"]
    _check(_run(command, out))


def test_trainer_under_accelerate_launch_with_deepspeed_config_file(tmp_path):
    out = tmp_path / "result.json"
    command = [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed", "--deepspeed_config_file",
               os.path.join(REPO, "ds_configs", "hf_auto_zero2_vrlamb.json"), "--main_process_port", str(_free_port()),
               SCRIPT, str(out)]
    _check(_run(command, out))
