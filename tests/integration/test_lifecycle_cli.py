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


def nights(tmp_path, seed: int, nights: int, written: int, changed: int) -> tuple[str, dict]:
    """A store of packs of 1 MiB and disk d backed up once a night (dated T0 + night days):
    ``written`` chunks of random data, ``changed`` of them rewritten before each night.
    Returns the store and {point id: snapshot of the image it holds}."""
    store = str(tmp_path / "store")
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    r = rng(seed)
    img = str(tmp_path / "d.img")
    make_sparse(img, (written * 5 // 3) * CS)
    write_at(img, 0, r.bytes(written * CS))
    points = {}
    for night in range(1, nights + 1):
        for k in r.choice(written, changed, replace=False):
            write_at(img, int(k) * CS, r.bytes(CS))
        proc = run_cli("backup", store, img, "--disk", "d", "--time", iso(T0 + night * DAY))
        assert proc.returncode == 0 and proc.stdout.strip() == f"d@{night}", proc.stderr
        points[f"d@{night}"] = snapshot(img, str(tmp_path / f"n{night}"))
    return store, points


def assert_restores(store: str, points: dict, tmp_path) -> None:
    for bid, src in points.items():
        out = str(tmp_path / f"r-{bid.replace('@', '-')}")
        proc = run_cli("restore", store, bid, out)
        assert proc.returncode == 0, proc.stderr
        assert same_file(out, src), bid
        os.unlink(out)


def test_ten_nights_forget_then_gc(tmp_path):
    store, points = nights(tmp_path, 501, nights=10, written=120, changed=24)

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
    assert_restores(store, points, tmp_path)
    assert run_cli("verify", store).returncode == 0


def test_forget_with_gc_gives_the_space_back_in_the_same_command(tmp_path):
    import jsonshape
    from lifecycle_helpers import read_db
    from helpers import store_fingerprint
    store, points = nights(tmp_path, 502, nights=6, written=60, changed=12)

    before = store_fingerprint(store)  # gc's options without --gc: refused, nothing changed
    proc = run_cli("forget", store, "--disk", "d", "--keep-last", "3", "--max-unused", "0")
    assert proc.returncode == 2 and "--gc" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert store_fingerprint(store) == before

    # --max-repack is passed through: 1 byte allows no repack (d@1's dead chunks share every pack
    # with live ones, so nothing is wholly dead either): gc ran and reclaimed nothing
    first = doc("forget", store, "--disk", "d", "--keep-last", "5", "--gc", "--max-unused", "0", "--max-repack", "1")
    assert first["removed"] == ["d@1"] and first["gc"]["repacked_packs"] == []
    assert first["gc"]["dead_bytes_before"] == first["gc"]["dead_bytes_after"] == first["freed_bytes"] > 0
    del points["d@1"]

    done = doc("forget", store, "--disk", "d", "--keep-last", "3", "--gc", "--max-unused", "0")
    assert not jsonshape.check(done, "forget")
    assert sorted(done["removed"]) == ["d@2", "d@3"]
    for n in (2, 3):
        del points[f"d@{n}"]
    swept = done["gc"]
    assert swept["dry_run"] is False and swept["repacked_packs"] and swept["dead_bytes_after"] == 0
    assert swept["dead_bytes_before"] == done["freed_bytes"] + first["gc"]["dead_bytes_after"]
    stats = doc("stats", store)  # the store itself says the space came back
    assert stats["dead_bytes"] == 0 and stats["stored_bytes"] == swept["stored_bytes_after"]
    files = {bytes.fromhex(f[:-5]) for _, _, fs in os.walk(os.path.join(store, "packs")) for f in fs
             if f.endswith(".pack")}
    assert files == set(read_db(store, b"packs"))  # the replaced packs' files are gone

    # nothing removed: gc does not run, the document has no gc member
    idle = doc("forget", store, "--disk", "d", "--keep-last", "3", "--gc")
    assert idle["removed"] == [] and "gc" not in idle
    assert doc("stats", store)["stored_bytes"] == swept["stored_bytes_after"]
    verify = run_cli("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr
    assert_restores(store, points, tmp_path)
