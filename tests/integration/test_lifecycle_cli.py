"""forget/delete and gc through the real command: the bytes forget says it frees are the dead
bytes it leaves, gc gives them back, every kept point restores identical."""

from __future__ import annotations

import datetime
import json
import os

from chunkstore import ChunkStore
from helpers import make_sparse, rng, run_cli, same_file, snapshot, write_at

CS = 64 << 10
DAY = 86400
T0 = 1_790_000_000  # 2026-09-21


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def doc(*args):
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_ten_nights_forget_then_gc(tmp_path):
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(501)
    img = str(tmp_path / "d.img")
    make_sparse(img, 200 * CS)
    write_at(img, 0, r.bytes(120 * CS))
    points = {}
    for night in range(1, 11):
        for k in r.choice(120, 24, replace=False):
            write_at(img, int(k) * CS, r.bytes(CS))
        proc = run_cli("backup", store, img, "--disk", "d", "--time", iso(T0 + night * DAY))
        assert proc.returncode == 0 and proc.stdout.strip() == f"d@{night}", proc.stderr
        points[f"d@{night}"] = snapshot(img, str(tmp_path / f"n{night}"))

    listed = {b["id"]: b["unique_bytes"] for b in doc("list", store)["backups"]}
    plan = doc("forget", store, "--disk", "d", "--keep-last", "3", "--dry-run")
    assert sorted(plan["removed"]) == sorted(f"d@{n}" for n in range(1, 8))
    assert plan["freed_bytes"] > sum(listed[f"d@{n}"] for n in range(1, 8))  # shared by removed points only
    done = doc("forget", store, "--disk", "d", "--keep-last", "3")
    for n in range(1, 8):
        del points[f"d@{n}"]
    stats = doc("stats", store)
    assert stats["dead_bytes"] == plan["freed_bytes"] == done["freed_bytes"]

    swept = doc("gc", store, "--max-unused", "0")
    assert swept["dead_bytes_before"] == plan["freed_bytes"] and swept["dead_bytes_after"] == 0
    after = doc("stats", store)
    assert after["dead_bytes"] == 0 and after["stored_bytes"] == swept["stored_bytes_after"]
    assert after["stored_bytes"] < stats["stored_bytes"] - plan["freed_bytes"] // 2
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr

    # delete by id, then the default gc (5%): the dead share is well above it.
    unique = {b["id"]: b["unique_bytes"] for b in doc("list", store)["backups"]}
    assert doc("delete", store, "d@8")["removed"] == ["d@8"]
    del points["d@8"]
    assert doc("stats", store)["dead_bytes"] == unique["d@8"] > 0
    again = doc("gc", store)
    assert again["dead_bytes_after"] <= again["max_unused_bytes"]
    for bid, src in points.items():
        out = str(tmp_path / f"r-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, src), bid
        os.unlink(out)
    assert run_cli("verify", store).returncode == 0
