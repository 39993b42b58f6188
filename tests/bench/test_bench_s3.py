"""The S3 bench's CI run: `python -m bench --s3 --quick` end to end, on a Ceph cluster it starts.

Correctness only, never speed: every step of both stores ran (backup, incremental,
restore, attach on an empty cache, copy local -> S3), each restore came back
byte-identical (the bench compares the bytes with the image it backed up), the
endpoint's limit was measured in the same run, and the figures the report divides
are there.  Missing Ceph packages fail the test, as for tests/s3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from s3cluster import missing_message  # noqa: E402

pytestmark = pytest.mark.s3

STEPS = {("local", "init"), ("s3", "init"), ("local", "backup"), ("s3", "backup"), ("local", "incremental"),
         ("s3", "incremental"), ("local", "restore"), ("s3", "restore"), ("s3", "restore@4thr"), ("s3", "restore#2"), ("s3", "restore@4thr#2"), ("s3", "attach"), ("s3", "restore@B"),
         ("local>s3", "copy"), ("s3", "restore@copy")}


def test_s3_bench_quick_restores_identical_from_every_store_and_measures_the_limit(tmp_path):
    if missing_message():
        pytest.fail(missing_message(), pytrace=False)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--s3", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["ok"] is True and all(c["ok"] for c in doc["checks"]), doc["checks"]
    seen = {(s["where"], s["step"]) for s in doc["steps"]}
    assert STEPS <= seen, STEPS - seen
    assert all(s["ok"] and s["peak_rss_bytes"] > 0 for s in doc["steps"]), [s for s in doc["steps"] if not s["ok"]]
    assert doc["restored_identical"] == {"local": True, "s3": True, "s3 restore@4thr": True, "s3 restore#2": True,
                                        "s3 restore@4thr#2": True, "s3 after attach": True, "s3 copy": True}
    # what the S3 backup put in the bucket is what attach read back on the empty cache
    backup = next(s for s in doc["steps"] if s["where"] == "s3" and s["step"] == "backup")
    assert backup["uploaded_bytes"] > 0.9 * doc["config"]["data_bytes"]    # random data: it does not compress
    runs = doc["limit"]["runs"]
    assert [(r["object_bytes"], r["threads"]) for r in runs] == [(32 << 20, 4), (8 << 20, 4), (8 << 20, 8)]
    assert all(r["put_mib_s"] > 0 and r["get_mib_s"] > 0 for r in runs)
    s = doc["summary"]
    assert s["backup_of_put"] > 0 and s["restore_of_get"] > 0
    assert not os.path.exists(out / "work"), "the work folder is removed unless --keep"
