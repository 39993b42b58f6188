"""``python -m bench --files`` end to end on a small disk: correctness, never speed.

The bench checks the fetched file and the restored image itself; here the
figures it prints are held against what they must be: the listing and the
one-file fetch read a small share of the chunks the full restore reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fsimages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if fsimages.missing_tools() and os.environ.get("CI", "").strip().lower() in ("", "0", "false", "no"):
    pytest.skip(f"needs {', '.join(fsimages.missing_tools())} (tools/install.sh --test)", allow_module_level=True)


def test_bench_files_runs_and_its_counts_hold(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--files", "--size", "1G", "--data", "48M",
                           "--chunk-size", "64K", "--rounds", "1", "--work", str(tmp_path), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["disk"]["chunks"] == (1 << 30) // (64 << 10)
    assert 0 < r["ls"]["chunks_read"] < r["disk"]["chunks"] // 100
    assert 16 <= r["get_1MiB"]["chunks_read"] < 16 + 16  # the file's 16 chunks, a few of metadata
    assert r["restore"]["chunks_read"] > 48 * 16 // 2  # the whole point: its data, compressed or not
    assert os.listdir(tmp_path) == []  # the work directory is removed
