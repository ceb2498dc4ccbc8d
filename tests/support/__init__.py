"""What the tests share and are not tests themselves: the float64 reference (reference.py), the DeepSpeed
harness and its model (ds_harness.py), launchers and spawned ranks (launching.py), real-BERT samples
(real_bert.py), and the scripts that launchers run (scripts/)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
SCRIPTS = REPO / "tests" / "support" / "scripts"
