"""The test launcher's retry: only the gloo teardown abort is retried, and only once."""

import sys
import warnings

import pytest

from tests.support import launching

SCRIPT = """
import pathlib, sys
runs = pathlib.Path(sys.argv[1])
runs.write_text((runs.read_text() if runs.exists() else "") + "x")
sys.stderr.write(sys.argv[2])
sys.exit(int(sys.argv[3]))
"""


def run_counting(tmp_path, message: str, code: int) -> tuple[int, int]:
    """(exit code, number of runs) of a command that prints ``message`` and exits with ``code``."""
    counter = tmp_path / "runs"
    done = launching.run([sys.executable, "-c", SCRIPT, str(counter), message, str(code)])
    return done.returncode, len(counter.read_text())


def test_teardown_abort_is_retried_once(tmp_path):
    with pytest.warns(UserWarning, match="teardown abort"):
        assert run_counting(tmp_path, launching.TEARDOWN_ABORT, 134) == (134, 2)


@pytest.mark.parametrize("message, code", [("Traceback: a real failure", 1), ("", 0)])
def test_other_outcomes_run_once(tmp_path, message, code):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_counting(tmp_path, message, code) == (code, 1)
