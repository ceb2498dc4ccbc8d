"""ds_config integration: names, validation, unsupported settings, version pin, the launcher."""

import json

import pytest

from tests.support import REPO
from tests.support.ds_harness import initialize_configs
from tests.support.launching import deepspeed_launch, run_in_repo, succeeded


def config(optimizer: dict, **extra) -> dict:
    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "optimizer": optimizer,
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
    base.update(extra)
    return base


CONFIGS = {
    "lower_case": config({"type": "vrlamb", "params": {"lr": 1e-3}}),
    "mixed_case": config({"type": "VrAdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.98]}}),
    "stage1_sgd": config({"type": "VRSGD", "params": {"lr": 0.1, "momentum": 0.9}}, zero_optimization={"stage": 1}),
    "unknown_key": config({"type": "VRLAMB", "params": {"lr": 1e-3, "bogus": 1}}),
    "auto": config({"type": "VRLAMB", "params": {"lr": "auto"}}),
    "auto_betas": config({"type": "VRLAMB", "params": {"lr": 1e-3, "betas": "auto", "eps": "auto"}}),
    "bad_gamma": config({"type": "VRLARS", "params": {"lr": 1e-3, "gamma": -1}}),
    "stage3": config({"type": "VRLAMB", "params": {"lr": 1e-3}}, zero_optimization={"stage": 3}),
    "quantized_weights": config({"type": "VRLAMB", "params": {"lr": 1e-3}},
                                zero_optimization={"stage": 3, "zero_quantized_weights": True}),
    "offload": config({"type": "VRLAMB", "params": {"lr": 1e-3}},
                      zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}),
    "one_sample": config({"type": "VRAdam", "params": {"lr": 1e-3}}, gradient_accumulation_steps=1),
}


@pytest.fixture(scope="module")
def outcomes():
    return dict(zip(CONFIGS, initialize_configs(list(CONFIGS.values()))))


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, expected", [("lower_case", "VRLAMB"), ("mixed_case", "VRAdamW"), ("stage1_sgd", "VRSGD")])
def test_types_are_case_insensitive_and_need_no_untested_flag(outcomes, name, expected):
    assert outcomes[name].get("type") == expected, outcomes[name]
    assert not any("untested" in w for w in outcomes[name]["warnings"])


def test_unknown_param_lists_the_valid_ones(outcomes):
    error = outcomes["unknown_key"]["error"]
    assert "ValueError" in error and "bogus" in error and "max_trust_ratio" in error and "gamma" in error


def test_auto_lr_needs_trainer_other_auto_values_take_defaults(outcomes):
    assert '"auto"' in outcomes["auto"]["error"] and '"lr"' in outcomes["auto"]["error"]
    assert outcomes["auto_betas"].get("type") == "VRLAMB", outcomes["auto_betas"]


def test_bad_hyperparameter_names_itself(outcomes):
    assert "gamma" in outcomes["bad_gamma"]["error"]


def test_unsupported_settings_are_named(outcomes):
    assert "zero_quantized_weights" in outcomes["quantized_weights"]["error"]


@pytest.mark.parametrize("name", ["offload", "stage3"])
def test_offload_and_stage3_are_accepted_from_the_config(outcomes, name):
    assert outcomes[name].get("type") == "VRLAMB", outcomes[name]


def test_one_sample_per_step_warns_and_falls_back(outcomes):
    assert outcomes["one_sample"].get("type") == "VRAdam"
    assert any("at least 2" in w for w in outcomes["one_sample"]["warnings"])


def test_deepspeed_launcher_runs_a_repo_config(tmp_path):
    summary = tmp_path / "summary.json"
    succeeded(run_in_repo(deepspeed_launch(2, REPO / "examples" / "deepspeed_minimal.py", "--deepspeed_config",
                                           REPO / "ds_configs" / "cpu_tiny_zero2_vrlamb.json", "--steps", "10",
                                           "--summary", summary), timeout=600))
    result = json.loads(summary.read_text())
    assert result["optimizer"] == "VRLAMB" and result["zero_stage"] == 2 and result["world_size"] == 2
    assert result["n"] == 4  # 2 ranks x 2 accumulation steps
    assert result["final_loss"] < result["first_loss"]
