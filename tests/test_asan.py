"""The ASan target: runtime_ops/asan/run.sh builds the op library with AddressSanitizer
(-DONNXZERO_ASAN=ON, into build/asan) and runs the op tests (tests/test_op_*.py) under it.

Kept cheap so it runs with the suite: `-k 'not slow'` and few hypothesis examples per test
(ONNXZERO_HYPOTHESIS_EXAMPLES, which the op tests read). The first run compiles the library
(about a minute); later runs only rebuild what changed. Skipped only when libasan is missing.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "runtime_ops" / "asan" / "run.sh"


def _libasan() -> str | None:
    try:
        path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(sys.platform != "linux", reason="the ASan target is for Linux/gcc")
def test_op_tests_pass_under_asan():
    if _libasan() is None:
        pytest.skip("libasan not found (gcc -print-file-name=libasan.so): install gcc's libasan to run the ASan target")
    build = Path(os.environ.get("ONNXZERO_ASAN_BUILD", ROOT / "build" / "asan"))
    build.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ONNXZERO_HYPOTHESIS_EXAMPLES": os.environ.get("ONNXZERO_HYPOTHESIS_EXAMPLES", "5")}
    env.pop("LD_PRELOAD", None)
    env["PYTHON"] = sys.executable  # the interpreter this suite tests, whatever `python` is on PATH
    # One ASan build at a time (parallel test sessions share build/asan).
    with open(build.parent / ".asan.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(["bash", str(SCRIPT), str(build), "-x", "-k", "not slow", "-p", "no:warnings"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode == 77:
        pytest.skip("libasan not found by runtime_ops/asan/run.sh")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"op tests under ASan failed (exit {proc.returncode}):\n{tail}"
    assert "AddressSanitizer" not in proc.stderr, tail
