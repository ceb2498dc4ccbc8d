"""ds_vrgd: VRGD (GSNR-scaled) optimizers for PyTorch and DeepSpeed.

``import ds_vrgd`` makes the optimizer types VRSGD, VRAdam, VRAdamW, VRLARS
and VRLAMB available; see :mod:`ds_vrgd.optim`.
"""

__version__ = "0.1.0"

from ds_vrgd import optim  # noqa: E402,F401
