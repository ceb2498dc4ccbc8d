"""The VR optimizers: torch.optim.Optimizer subclasses usable without DeepSpeed.

Each is its base rule (SGD, Adam, AdamW, LARS, LAMB) with the GSNR factor
rho of :mod:`ds_vrgd.gsnr` as an element-wise learning-rate multiplier
(docs/design.md §2). ``vr=False`` gives the base optimizer exactly.
"""

from ds_vrgd.optim._base import VROptimizer
from ds_vrgd.optim.adam import VRAdam, VRAdamW
from ds_vrgd.optim.lamb import VRLAMB
from ds_vrgd.optim.lars import VRLARS
from ds_vrgd.optim.options import VROptions
from ds_vrgd.optim.sgd import VRSGD

VR_OPTIMIZERS: dict[str, type[VROptimizer]] = {cls.__name__: cls for cls in (VRSGD, VRAdam, VRAdamW, VRLARS, VRLAMB)}
"""The VR optimizers by class name, the ds_config ``optimizer.type`` names (matched in any case there)."""

__all__ = ["VROptimizer", "VROptions", "VRSGD", "VRAdam", "VRAdamW", "VRLARS", "VRLAMB", "VR_OPTIMIZERS"]
