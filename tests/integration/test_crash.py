"""A backup killed with SIGKILL at random points never damages the store."""

import os
import random
import signal
import subprocess
import sys
import time

from chunkstore import ChunkStore
from engine.repository import Repository
from engine.restore import restore_backup
from engine.verify import verify_repository
from helpers import REPO_ROOT, make_sparse, rng, same_file, snapshot, write_at

CS = 64 << 10
KILLS = 20
MAX_ROUNDS = 40


def _start_backup(store, img, disk):
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "backup", store, img, "--disk", disk,
                             "--mode", "incremental"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_during_backup_leaves_store_consistent(tmp_path):
    store = str(tmp_path / "store")
    # Small packs so kills also land between pack seals.
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    size = 96 << 20
    make_sparse(img, size)
    r = rng(60)
    write_at(img, 0, r.bytes(4 << 20))
    subprocess.run([sys.executable, "-m", "engine.cli", "backup", store, img, "--disk", "d"],
                   cwd=REPO_ROOT, check=True)
    expected = {"d@1": snapshot(img, str(tmp_path / "p1"))}

    # Time one uninterrupted run to spread the kills over a whole backup.
    write_at(img, 8 << 20, r.bytes(48 << 20))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "engine.cli", "backup", store, img, "--disk", "d", "--mode",
                    "incremental"], cwd=REPO_ROOT, check=True)
    duration = time.monotonic() - t0
    expected["d@2"] = snapshot(img, str(tmp_path / "p2"))

    chooser = random.Random(61)
    killed = 0
    for i in range(MAX_ROUNDS):
        if killed >= KILLS:
            break
        # New data each round, so every attempt has chunks to write.
        write_at(img, (8 << 20) + i * (1 << 20), r.bytes(40 << 20))
        version = snapshot(img, str(tmp_path / f"v{i}"))
        proc = _start_backup(store, img, "d")
        time.sleep(chooser.uniform(0.05, duration))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        with Repository.open(store) as repo:
            with repo.store.read_txn() as txn:
                ids = [rec.id for rec in repo.catalog.for_disk(txn, "d")]
            new = [x for x in ids if x not in expected]
            assert len(new) <= 1
            if new:  # the run finished before the kill: it must be a whole backup
                expected[new[0]] = version
            else:
                os.unlink(version)
            assert set(ids) == set(expected)
    assert killed >= KILLS, f"only {killed} of {MAX_ROUNDS} runs were killed mid-way"

    with Repository.open(store) as repo:
        report = verify_repository(repo)
        assert report.ok, report.as_dict()
        for ident, src in expected.items():
            out = str(tmp_path / f"restore-{ident.replace('@', '-')}")
            restore_backup(repo, ident, out)
            assert same_file(out, src), ident
            os.unlink(out)
