#!/usr/bin/env bash
# The test command: sets itself up (launch/_env.sh), then runs the whole suite,
# slow multi-process DeepSpeed tests included. Extra arguments go to pytest,
# e.g. `bash launch/test.sh -m "not slow"` for the quick part only.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
exec python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
