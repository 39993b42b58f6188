"""Two VMs backed up into one store at once through ``blockvault vsphere backup``
(issue 10 item 5): one frozen mid-backup while the other commits, a second
backup of the frozen VM refused naming it, every disk restored identical and
the store rebuilt from its packs identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from chunkstore.registry import PathRegistry
from helpers import store_fingerprint
from vsphere_helpers import (REPO_ROOT, MiB, bv, cli_env, create_vm, image, init_store, server_args, snapshot_names,
                             write)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=REPO_ROOT, env=cli_env(),
                            text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _registered(store: str, pid: int, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in PathRegistry(store).entries():
            if e.pid == pid and e.live and e.packs:
                return e
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never started writing into {store}")


def test_two_vms_back_up_at_once_and_one_vm_only_once(vcsim, tmp_path):
    store = init_store(tmp_path / "store")
    srv = server_args(vcsim)
    web = create_vm(vcsim, "web01", [24 * MiB // 1024, 4 * MiB // 1024])
    db = create_vm(vcsim, "db01", [8 * MiB // 1024])
    for vm, seed in ((web, 1), (db, 2)):
        for i, disk in enumerate(vcsim.disks(vm.config)):
            size = disk.capacityInKB * 1024
            write(vcsim, disk, 0, os.urandom(size - (i + 1) * 64 * 1024))
    first = _start("vsphere", "backup", store, *srv, "--vm", "web01", "--json")
    try:
        holder = _registered(store, first.pid)
        first.send_signal(signal.SIGSTOP)
        snapshots = snapshot_names(web)
        assert len(snapshots) == 1                       # the first backup's
        # Another VM is not held up by web01's backup.
        other = bv("vsphere", "backup", store, *srv, "--vm", "db01", "--json", timeout=300)
        assert other.returncode == 0, other.stderr
        assert json.loads(other.stdout)["id"] == "db01@1"
        # web01 itself is: a second backup of it fails at once, naming the first.
        again = bv("vsphere", "backup", store, *srv, "--vm", "web01", "--json")
        assert again.returncode == 4, again.stdout + again.stderr
        err = json.loads(again.stdout)["error"]
        assert err["code"] == "store_locked" and err["holder"]["pid"] == first.pid
        assert err["holder"]["session"] == holder.id and err["holder"]["purpose"] == "vSphere backup of VM web01"
        assert "VM web01 is busy" in err["message"]
        assert snapshot_names(web) == snapshots          # refused before it made a snapshot of its own
        first.send_signal(signal.SIGCONT)
        out, errs = first.communicate(timeout=300)
        assert first.returncode == 0, errs
        assert json.loads(out)["id"] == "web01@1"
    finally:
        for p in (first,):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    assert PathRegistry(store).entries() == []
    for vm, name in ((web, "web01"), (db, "db01")):
        for disk in vcsim.disks(vm.config):
            out = tmp_path / f"{name}-{disk.key}.img"
            proc = bv("restore", store, f"{name}/disk-{disk.key}@1", out)
            assert proc.returncode == 0, proc.stderr
            assert out.read_bytes() == image(vcsim, disk), (name, disk.key)
    verify = bv("verify", store)
    assert verify.returncode == 0 and "store OK" in verify.stdout, verify.stdout + verify.stderr
    before = store_fingerprint(store)
    os.rename(os.path.join(store, "index"), str(tmp_path / "index-aside"))
    rebuilt = bv("rebuild", store)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert store_fingerprint(store) == before
