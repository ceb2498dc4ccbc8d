"""ds_vrgd: VRGD (GSNR-scaled) optimizers for PyTorch and DeepSpeed.

``from ds_vrgd.optim import VRLAMB`` gives the optimizers (:mod:`ds_vrgd.optim`). ``import ds_vrgd``
also registers them as ds_config optimizer types (:func:`ds_vrgd.deepspeed.register`), at once or,
by an import hook, right after DeepSpeed's first import; ``ds_vrgd.initialize`` is a drop-in for
``deepspeed.initialize``, and ``ds_vrgd.shutdown`` ends a run. Why the hook: docs/deepspeed.md, "Registration and the ds_config".
"""

import importlib.abc
import importlib.util
import sys
import warnings

from ds_vrgd import optim  # noqa: F401

__version__ = "0.1.0"


def _register() -> None:
    """Register the VR types with the imported DeepSpeed; warn if its version is unsupported.

    When DeepSpeed's import was triggered by ``import ds_vrgd.deepspeed`` itself,
    that module is still initialising here; it registers at the end of its import.
    """
    if "ds_vrgd.deepspeed" in sys.modules and not hasattr(sys.modules["ds_vrgd.deepspeed"], "register"):
        return
    try:
        from ds_vrgd.deepspeed import register
    except ImportError as error:
        warnings.warn(f"ds_vrgd: VR optimizer types not registered with DeepSpeed: {error}", stacklevel=2)
        return
    register()


class _RegisterAfterDeepSpeedImport(importlib.abc.MetaPathFinder):
    """The import hook of the module docstring: run :func:`_register` once ``import deepspeed`` has executed.

    ``find_spec`` may also be called without an import (``importlib.util.find_spec``
    availability checks, as transformers does), so the hook stays installed until
    the module really executes.
    """

    _resolving = False

    def find_spec(self, name, path, target=None):
        if name != "deepspeed" or self._resolving:
            return None
        self._resolving = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._resolving = False
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register()

            spec.loader.exec_module = exec_then_register
        return spec


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` (same arguments and return value) with the VR types registered."""
    from ds_vrgd.deepspeed import initialize as ds_initialize

    return ds_initialize(*args, **kwargs)


def shutdown() -> None:
    """The end of a DeepSpeed run on this rank (:func:`ds_vrgd.deepspeed.shutdown`): destroys the process group
    and frees the shared memory DeepSpeed's CPU communication leaves behind."""
    from ds_vrgd.deepspeed import shutdown as ds_shutdown

    ds_shutdown()


if "deepspeed" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterDeepSpeedImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterDeepSpeedImport())
