"""One `dreamtune quickstart` run shared by every test that needs its artifacts (test_quickstart.py,
test_notebooks.py). Import the fixture into a test module:

    from _quickstart_fixture import quickstart_out  # noqa: F401  (a pytest fixture)

The run happens at most once per pytest session, whichever module asks first: the result is cached
here, in the module, because a fixture imported into two modules is registered twice by pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The quickstart is the suite's longest test (about 2-4 minutes on a 2-core CPU); this bounds a hang.
TIMEOUT_S = 900
_CACHE: dict = {}


def run_quickstart(out: Path) -> dict:
    """Run the CLI in a fresh process (as a user would), return {"out", "summary", "stdout", "stderr", "time_s"}."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dreamtune.cli", "quickstart", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"dreamtune quickstart exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {"out": out, "summary": json.loads((out / "quickstart.json").read_text()), "stdout": proc.stdout,
            "stderr": proc.stderr, "time_s": time.time() - t0}


@pytest.fixture(scope="session")
def quickstart_out(tmp_path_factory) -> dict:
    if "run" not in _CACHE:
        try:
            _CACHE["run"] = run_quickstart(tmp_path_factory.mktemp("quickstart") / "out")
        except AssertionError as e:  # fail every dependent test with the same message, without rerunning
            _CACHE["run"] = e
    if isinstance(_CACHE["run"], Exception):
        pytest.fail(str(_CACHE["run"]))
    return _CACHE["run"]
