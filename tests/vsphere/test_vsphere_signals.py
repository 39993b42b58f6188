"""SIGTERM in the middle of a VM backup: the disks stop, the snapshot goes, the store is as it was."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import BLOCK, MiB, REPO_ROOT, bv, cli_env, create_vm, server_args, snapshot_names, write

from helpers import store_fingerprint  # noqa: E402


def _packs(store):
    return glob.glob(os.path.join(store, "packs", "*", "*.pack"))


def test_sigterm_stops_every_disk_and_removes_the_snapshot(vcsim, tmp_path):
    store = str(tmp_path / "store")
    # zstd 19 on low-entropy bytes: slow enough that the run is surely mid-way when signalled.
    assert bv("init", store, "--chunk-size", "64K", "--compression-level", "19").returncode == 0
    vm = create_vm(vcsim, "sig01", [256 * 1024, 256 * 1024], cbt=True)
    r = np.random.default_rng(95)
    for disk in vcsim.disks(vm.config):
        write(vcsim, disk, BLOCK, r.integers(0, 16, size=64 * MiB, dtype=np.uint8).tobytes())
    assert bv("vsphere", "list", store).returncode == 0  # creates the (empty) VM catalog database
    before = store_fingerprint(store)
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "vsphere", "backup", store, *server_args(vcsim),
                             "--vm", "sig01", "--transport", "http"], cwd=REPO_ROOT, env=cli_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not _packs(store):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no pack file after 60 s"
        time.sleep(0.005)
    assert snapshot_names(vm) == ["blockvault-backup"]
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    resumed = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - resumed
    assert proc.returncode == 143, err
    assert "blockvault: terminated by SIGTERM; VM backup aborted, its packs deleted; the store is as it was" in err
    assert "nothing was committed to the store, the backup snapshot was removed" in err
    assert "Traceback" not in err and out == ""
    assert took < 15, f"{took:.1f}s from SIGTERM to exit: the disks did not stop"
    assert snapshot_names(vm) == []
    assert _packs(store) == [] and store_fingerprint(store) == before
