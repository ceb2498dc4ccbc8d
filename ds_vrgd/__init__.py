"""ds_vrgd: VRGD (GSNR-scaled) optimizers for PyTorch and DeepSpeed.

``import ds_vrgd`` makes the optimizer types VRSGD, VRAdam, VRAdamW, VRLARS
and VRLAMB available; see :mod:`ds_vrgd.optim`.
"""

__version__ = "0.1.0"

from ds_vrgd import optim  # noqa: E402,F401


def _register_with_deepspeed() -> None:
    """Register the VR types with DeepSpeed when it is installed (ds_config "type": "VRLAMB")."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    from ds_vrgd.deepspeed import register

    register()


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` with the VR optimizer types registered."""
    from ds_vrgd.deepspeed import initialize as ds_initialize

    return ds_initialize(*args, **kwargs)


_register_with_deepspeed()
