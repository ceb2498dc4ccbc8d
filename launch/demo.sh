#!/usr/bin/env bash
# The main command: sets itself up (launch/_env.sh), then runs the demo.
# Now: the plain-PyTorch quick start (VR optimizer vs its base, side by side).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
python examples/quickstart.py "$@"
