"""The DeepSpeed internals ds_vrgd relies on (ds_vrgd.deepspeed.DEEPSPEED_INTERNALS) are checked at import:
the installed DeepSpeed passes; a missing method, a renamed parameter, a missing attribute or one no
longer assigned is an ImportError naming it, the installed version and the supported range."""

import re

import deepspeed
import pytest
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.zero import utils as zero_utils
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from ds_vrgd.deepspeed import check_internals

SUPPORTED = "deepspeed>=0.19.8,<0.20"


def _failure() -> str:
    with pytest.raises(ImportError) as raised:
        check_internals()
    message = str(raised.value)
    assert SUPPORTED in message and f"installed deepspeed {deepspeed.__version__}" in message
    return message


def test_installed_deepspeed_has_every_internal():
    check_internals()


def test_missing_method(monkeypatch):
    monkeypatch.delattr(DeepSpeedEngine, "_take_model_step")
    assert "DeepSpeedEngine._take_model_step: missing method" in _failure()


@pytest.mark.parametrize("owner, name, replacement, found", [
    (DeepSpeedZeroOptimizer_Stage3, "get_param_id", lambda self, parameter: 0, "('self', 'parameter')"),
    # a method register() wraps: its signature is the one DeepSpeed's function has
    (DeepSpeedEngine, "_configure_optimizer", lambda self, optimizer, model_parameters: None,
     "('self', 'optimizer', 'model_parameters')"),
], ids=["get_param_id", "_configure_optimizer"])
def test_renamed_parameter(monkeypatch, owner, name, replacement, found):
    monkeypatch.setattr(owner, name, replacement)
    assert f"{owner.__name__}.{name}: parameters {found}, expected" in _failure()


@pytest.mark.parametrize("owner, name, qualified", [
    (PipelineEngine, "_INSTRUCTION_MAP", "PipelineEngine._INSTRUCTION_MAP"),
    (zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS"),
], ids=["class", "module"])
def test_missing_attribute(monkeypatch, owner, name, qualified):
    monkeypatch.delattr(owner, name)
    assert f"{qualified}: missing" in _failure()


def test_attribute_no_longer_assigned(monkeypatch):
    def __init__(self, *args, **kwargs):
        self.round_robin_bit16_offsets = []

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "__init__", __init__)
    message = _failure()
    assert "DeepSpeedZeroOptimizer.round_robin_bit16_groups: never assigned" in message
    assert "round_robin_bit16_offsets" not in message
    assert re.findall(r"(\w+\.\w+): never assigned", message) == [
        f"DeepSpeedZeroOptimizer.{name}" for name in ("round_robin_bit16_groups", "parallel_partitioned_bit16_groups",
                                                      "single_partition_of_fp32_groups", "real_dp_process_group")]
