"""Registration with DeepSpeed (either import order), the version pin, the repo's ds_configs."""

import json

import pytest
import os
import subprocess
import sys

from tests.support import REPO


def _wrapped_after(statements: str) -> str:
    code = statements + (
        "; from deepspeed.runtime.engine import DeepSpeedEngine as E"
        "; print(hasattr(E._configure_basic_optimizer, '__wrapped__'), 'deepspeed' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", "import sys; " + code], capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_registers_when_deepspeed_is_imported_first():
    assert _wrapped_after("import deepspeed; import ds_vrgd") == "True True"


def test_registers_when_deepspeed_is_imported_later():
    assert _wrapped_after("import ds_vrgd; import deepspeed") == "True True"


def test_registers_after_an_availability_check_like_transformers_does():
    statements = "import ds_vrgd, importlib.util; importlib.util.find_spec('deepspeed'); import deepspeed"
    assert _wrapped_after(statements) == "True True"


def test_registers_when_the_adapter_module_imports_deepspeed():
    statements = "import warnings; warnings.simplefilter('error'); import ds_vrgd; import ds_vrgd.deepspeed"
    assert _wrapped_after(statements) == "True True"


def test_plain_import_does_not_import_deepspeed():
    done = subprocess.run([sys.executable, "-c", "import sys, ds_vrgd; print('deepspeed' in sys.modules)"],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False"


def test_version_pin_is_checked():
    from ds_vrgd.deepspeed import check_version

    check_version("0.19.8")
    with pytest.raises(ImportError, match=r"deepspeed>=0.19.8,<0.20"):
        check_version("0.18.4")
    with pytest.raises(ImportError, match="found 0.20.1"):
        check_version("0.20.1")


def test_every_config_in_ds_configs_is_valid_json_with_a_known_optimizer():
    from ds_vrgd.deepspeed import vr_optimizer_class

    names = sorted(os.listdir(os.path.join(REPO, "ds_configs")))
    assert names
    for name in names:
        with open(os.path.join(REPO, "ds_configs", name)) as f:
            cfg = json.load(f)
        kind = cfg["optimizer"]["type"]
        cls = vr_optimizer_class(kind)
        if cls is not None:
            params = {k: v for k, v in cfg["optimizer"].get("params", {}).items() if v != "auto"}
            cls([__import__("torch").nn.Parameter(__import__("torch").zeros(2))], **params)


