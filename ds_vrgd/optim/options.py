"""Options of the VR optimizers: defaults and validation (a ValueError names the option, the value and
the valid range or type; docs/usage.md lists them)."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ds_vrgd import gsnr


@dataclass(frozen=True)
class VROptions:
    """The options every VR optimizer takes as keywords (docs/design.md §2, docs/usage.md "Options").

    gamma:             rho lies in [max(0, 1 - gamma), 1 + gamma]; 0 gives the base optimizer.
    eps_gsnr:          added to the variance in r = m^2 / (v + eps_gsnr).
    gsnr_max:          cap on r (None: no cap; docs/design.md §3).
    gsnr_warmup_steps: steps with rho = 1 before the factor starts.
    gsnr_ema:          beta of a bias-corrected EMA of q across steps (0: none).
    gsnr_interval:     take the statistics on every k-th step after warm-up and hold rho in between
                       (1: every step; docs/design.md §2, "The statistics schedule").
    vr:                False: no capture, no GSNR; the base optimizer exactly.
    """

    gamma: float = 0.1
    eps_gsnr: float = 1e-20
    gsnr_max: Optional[float] = gsnr.GSNR_MAX
    gsnr_warmup_steps: int = 0
    gsnr_ema: float = 0.0
    gsnr_interval: int = 1
    vr: bool = True


VR_DEFAULTS = asdict(VROptions())
"""The shared options' defaults as a dict (what a param group holds)."""


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")


def _in_interval(value: Any, low: float, high: float, low_open=False, high_open=True) -> bool:
    """Whether value is an int or float (not a bool) in the interval. The type is checked before any
    comparison, so strings, None, lists... give False rather than a TypeError; NaN fails the comparisons."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return (low < value if low_open else low <= value) and (value < high if high_open else value <= high)


def check_range(
    name: str, value: Any, low: float, high: float = math.inf, *, low_open=False, high_open=True, optional=False
) -> None:
    """ValueError naming the option unless value is an int or float (not a bool, not NaN) in the
    interval, or None with ``optional``."""
    if (optional and value is None) or _in_interval(value, low, high, low_open, high_open):
        return
    kind = "None or a number (int or float)" if optional else "a number (int or float)"
    raise ValueError(f"Invalid {name}: {value!r}; expected {kind} in {_interval(low, high, low_open, high_open)}")


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    """ValueError naming the option unless value is True or False (or None with ``optional``); 0, 1 and
    strings such as "yes" are refused, not converted."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"Invalid {name}: {value!r}; expected True or False" + (" or None" if optional else ""))


def check_int(name: str, value: Any, low: int) -> None:
    """ValueError naming the option unless value is an int (not a bool) >= low."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer (int) >= {low}")


def validate_vr_options(options: dict) -> None:
    """Check the options every VR optimizer shares (raise ValueError naming the bad one): lr,
    weight_decay, gamma, eps_gsnr >= 0; gsnr_max None or > 0; gsnr_ema in [0, 1); gsnr_warmup_steps
    an int >= 0; gsnr_interval an int >= 1; vr a bool; foreach None or a bool."""
    check_range("lr", options["lr"], 0.0)
    check_range("weight_decay", options["weight_decay"], 0.0)
    check_range("gamma", options["gamma"], 0.0)
    check_range("eps_gsnr", options["eps_gsnr"], 0.0)
    check_range("gsnr_max", options["gsnr_max"], 0.0, low_open=True, optional=True)
    check_range("gsnr_ema", options["gsnr_ema"], 0.0, 1.0)
    check_int("gsnr_warmup_steps", options["gsnr_warmup_steps"], 0)
    check_int("gsnr_interval", options["gsnr_interval"], 1)
    check_bool("vr", options["vr"])
    check_bool("foreach", options.get("foreach"), optional=True)


def validate_betas(betas: Any) -> None:
    """betas must be a tuple or list of two numbers (int or float), each in [0, 1)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_in_interval(beta, 0.0, 1.0) for beta in betas)):
        raise ValueError(
            f"Invalid betas: {betas!r}; expected a pair (beta1, beta2) of numbers (int or float) in [0.0, 1.0)"
        )


def validate_eps(eps: Any) -> None:
    """eps must be a number (int or float) > 0."""
    check_range("eps", eps, 0.0, low_open=True)


def split_vr_options(cls: type, keywords: dict) -> dict:
    """The shared options of ``keywords`` over their defaults; ValueError for a name the optimizer ``cls``
    does not take, listing the valid ones (its own parameters, then :class:`VROptions`'s).

    Returns the param-group dict of the :class:`VROptions` values.
    """
    unknown = sorted(set(keywords) - set(VR_DEFAULTS))
    if unknown:
        own = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params", "vr_options")]
        raise ValueError(
            f"{cls.__name__} got unknown option(s) {unknown}; valid options are: {', '.join(own + list(VR_DEFAULTS))}"
        )
    return {**VR_DEFAULTS, **keywords}
