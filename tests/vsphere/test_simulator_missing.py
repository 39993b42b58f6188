"""Without the simulator binary the vSphere tests never pass silently.

Outside CI they are skipped and the run ends with one loud summary line naming
the missing binary and how to build it; under CI (``CI=true``) every test that
needs the simulator fails, so the run fails.  Checked by running pytest itself
on two of the simulator test modules, one using the ``vcsim`` fixture and one
``vcsim_factory``, with ``VCSIM_BIN`` pointing at a file that does not exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
MODULES = ["tests/vsphere/test_vcsim.py", "tests/vsphere/test_vsphere_short_flat.py"]


def _pytest(tmp_path, ci: str | None):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["VCSIM_BIN"] = str(tmp_path / "no-such-vcsim")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           *MODULES], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _counts(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)", last)}


def test_missing_simulator_is_said_loudly_outside_ci(tmp_path):
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("vSphere tests SKIPPED")]
    assert len(lines) == 1, proc.stdout
    missing = tmp_path / "no-such-vcsim"
    assert re.fullmatch(rf"vSphere tests SKIPPED \((\d+)\): simulator binary {re.escape(str(missing))} not "
                        r"built \(run: bash tools/vcsim/build\.sh, or set VCSIM_BIN\); under CI \(CI=true\) "
                        r"this fails the run", lines[0]), lines[0]
    counts = _counts(proc.stdout)
    skipped = int(re.search(r"\((\d+)\)", lines[0]).group(1))
    assert skipped == counts["skipped"] >= 20                 # every simulator test, none run
    assert "error" not in counts and "failed" not in counts


def test_missing_simulator_fails_the_run_under_ci(tmp_path):
    proc = _pytest(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    counts = _counts(proc.stdout)
    assert counts.get("errors", counts.get("error", 0)) >= 20 and "skipped" not in counts, proc.stdout
    assert "vcsim tests cannot run under CI: simulator binary" in proc.stdout
    assert "vSphere tests SKIPPED" not in proc.stdout
