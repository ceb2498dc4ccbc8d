"""Inputs that fail clearly (issue 12): option types and ranges, ds_config optimizer names and its "vrgd" section;
fp16/bf16 at ZeRO 0 runs under DeepSpeed's unfused wrapper.

Every bad option is a ValueError naming the option and quoting the value; the
DeepSpeed cases run ``deepspeed.initialize`` in this process on a 1-rank gloo group.
"""

import pytest
import torch

from ds_vrgd.optim import VR_OPTIMIZERS, VRLAMB, VRLARS, VRSGD, VRAdam, VRAdamW
from tests.support.ds_harness import train_engine
from tests.support.launching import free_port

ALL = tuple(VR_OPTIMIZERS.values())
ADAM_LIKE = (VRAdam, VRAdamW, VRLAMB)
NOT_NUMBERS = ("0.1", None, True, [0.1])
NOT_BOOLS = ("yes", 1, None)


def _cases(classes, option, values):
    return [(cls, option, value) for cls in classes for value in values]


BAD = (
    [case for option in ("lr", "eps_gsnr", "weight_decay", "gamma", "gsnr_ema")
     for case in _cases(ALL, option, NOT_NUMBERS)]
    + _cases(ALL, "lr", [float("nan"), -1.0])
    + _cases(ALL, "gsnr_max", ["1e3", True, [1.0], 0.0])
    + _cases(ALL, "gsnr_warmup_steps", [1.0, 2.5, "3", None, True, -1])
    + _cases(ALL, "gsnr_interval", [0, 2.0, "10", None, True, -1])
    + _cases(ALL, "vr", NOT_BOOLS)
    + _cases(ALL, "foreach", ["yes", 0])
    + _cases(ADAM_LIKE, "eps", NOT_NUMBERS)
    + _cases(ADAM_LIKE, "betas", [(0.9, "0.999"), ("0.9", 0.999), (0.9, None), "ab", None, (0.9,), (True, 0.9)])
    + _cases((VRSGD, VRLARS), "momentum", NOT_NUMBERS)
    + _cases((VRSGD,), "dampening", NOT_NUMBERS)
    + _cases((VRSGD,), "nesterov", NOT_BOOLS)
    + _cases((VRLARS,), "trust_coefficient", NOT_NUMBERS)
    + _cases((VRLAMB,), "max_trust_ratio", NOT_NUMBERS)
    + _cases((VRLARS, VRLAMB), "exclude_1d", ("no", 0, None))
)


def _id(case) -> str:
    cls, option, value = case
    return f"{cls.__name__}-{option}={value!r}"


def _params():
    return [torch.nn.Parameter(torch.zeros(2, 2))]


@pytest.mark.parametrize("cls, option, value", BAD, ids=[_id(case) for case in BAD])
def test_bad_option_names_itself_and_the_value(cls, option, value):
    with pytest.raises(ValueError) as info:
        cls(_params(), **{option: value})
    message = str(info.value)
    assert f"Invalid {option}" in message and repr(value) in message and "expected" in message, message


@pytest.mark.parametrize("cls, option, value", BAD[::7], ids=[_id(case) for case in BAD[::7]])
def test_add_param_group_validates_the_group(cls, option, value):
    optimizer = cls(_params())
    with pytest.raises(ValueError, match=f"Invalid {option}"):
        optimizer.add_param_group({"params": _params(), option: value})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("cls", ALL)
def test_edge_values_that_are_valid(cls):
    options = dict(lr=1, weight_decay=0, gamma=0, gsnr_max=None, gsnr_warmup_steps=3, gsnr_ema=0.5, vr=False,
                   foreach=False)
    if cls in ADAM_LIKE:
        options.update(betas=[0, 0.5], eps=1)
    optimizer = cls(_params(), **options)
    optimizer.add_param_group({"params": _params(), "lr": 0.5, "gsnr_max": 10})
    assert optimizer.param_groups[1]["gsnr_max"] == 10


def test_nesterov_message_names_momentum_and_dampening():
    with pytest.raises(ValueError, match=r"Invalid nesterov: True with momentum=0.0, dampening=0.0"):
        VRSGD(_params(), nesterov=True)


# ------------------------------------------------------------------ DeepSpeed
@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group in this process (DeepSpeed's CPU accelerator), destroyed afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                               LOCAL_RANK="0", DS_ACCELERATOR="cpu").items():
            patch.setenv(key, value)
        import deepspeed

        import ds_vrgd  # noqa: F401  registers the VR types

        deepspeed.init_distributed(dist_backend="gloo")
        yield deepspeed
        from ds_vrgd.deepspeed import shutdown
        shutdown()


def _config(kind: str, **extra) -> dict:
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "steps_per_print": 10**9,
              "optimizer": {"type": kind, "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
    return dict(config, **extra)


@pytest.mark.parametrize("kind", [" VRLAMB", "vrlamb ", "VrLaMb", "\tvrLAMB\n"])
def test_vr_type_names_ignore_case_and_surrounding_whitespace(one_rank, small_model, kind):
    engine, _, _, _ = one_rank.initialize(model=small_model, model_parameters=small_model.parameters(),
                                          config=_config(kind))
    assert type(engine.basic_optimizer) is VRLAMB
    assert train_engine(engine, {"steps": 1, "gas": 2}, rank=0) == [0]
    assert engine.vr_optimizer.gsnr_stats()["n"] == 2


@pytest.mark.parametrize("kind, suggestion", [("vrlambb", "VRLAMB"), (" lamb", "lamb"), ("nonsense", None)])
def test_unknown_type_lists_the_valid_ones(one_rank, small_model, kind, suggestion):
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    with pytest.raises(ValueError) as info:
        one_rank.initialize(model=small_model, model_parameters=small_model.parameters(), config=_config(kind))
    message = str(info.value)
    assert repr(kind) in message
    assert all(name in message for name in (*VR_OPTIMIZERS, *DEEPSPEED_OPTIMIZERS))
    if suggestion is None:
        assert "did you mean" not in message
    else:
        assert f"did you mean {suggestion!r}?" in message


def test_build_optimizer_normalises_and_rejects_names():
    from ds_vrgd.deepspeed import build_optimizer

    assert type(build_optimizer(" VRAdamW ", _params(), {"lr": 0.1})) is VRAdamW
    with pytest.raises(ValueError, match=r"'vradamww' is not a VR optimizer .*did you mean 'VRAdamW'"):
        build_optimizer("vradamww", _params(), {"lr": 0.1})


@pytest.mark.parametrize("client", [False, True], ids=["ds_config", "client_optimizer"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_at_stage_0_runs_under_the_unfused_wrapper_without_its_initial_step(
        one_rank, monkeypatch, small_model, precision, client):
    """fp16/bf16 at ZeRO 0: DeepSpeed's FP16_UnfusedOptimizer; its zero-gradient step at construction is not
    taken for a VR optimizer (it would count a step and decay the fp32 master weights)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)  # the CPU accelerator refuses fp16
    config = _config("VRAdamW", zero_optimization={"stage": 0}, **{precision: {"enabled": True}})
    optimizer = VRAdamW(small_model.parameters(), lr=0.1, weight_decay=0.5) if client else None
    if client:
        del config["optimizer"]
    engine, *_ = one_rank.initialize(model=small_model, model_parameters=small_model.parameters(), optimizer=optimizer,
                                     config=config)
    assert type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer"
    assert not engine.vr_optimizer.state
    masters = [p for group in engine.vr_optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(master, p.float()) for master, p in zip(masters, engine.module.parameters()))


@pytest.mark.parametrize("section, message", [
    ({"local_sum": True}, """ds_config "vrgd" has no key 'local_sum'; valid keys: local_sums"""),
    ({"local_sums": "yes"}, 'ds_config "vrgd.local_sums" is "yes"; expected one of "auto", true, false'),
    ({"local_sums": 1}, 'ds_config "vrgd.local_sums" is 1; expected one of "auto", true, false'),
    (["local_sums"], """ds_config "vrgd" must be an object like {"local_sums": "auto"}, got ['local_sums']"""),
])
def test_bad_vrgd_section_names_the_key_and_the_values(one_rank, small_model, section, message):
    with pytest.raises(ValueError) as info:
        one_rank.initialize(model=small_model, model_parameters=small_model.parameters(),
                            config=_config("VRSGD", vrgd=section))
    assert str(info.value) == message
