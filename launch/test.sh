#!/usr/bin/env bash
# The test command: sets itself up (launch/_env.sh), then runs the whole suite,
# slow multi-process DeepSpeed tests included. Extra arguments go to pytest,
# e.g. `bash launch/test.sh -m "not slow"` for the quick part only.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
# The multi-process tests start 2-4 ranks on a machine that may have 2 cores: one
# OpenMP thread per process avoids oversubscription (threads spinning at every
# op's barrier while their partner is descheduled).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
