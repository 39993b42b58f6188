"""A thin disk whose ``-flat.vmdk`` is shorter than the disk's capacity, read over datastore HTTP.

The simulator runs with ``-grow-flat-files=false``: each flat file is as long
as what the guest wrote (govmomi's simulator alone behaves like that, and so
may a datastore that stores a thin disk short).  The server then cuts a range
at the end of the file (206 with ``bytes A-END/TOTAL``) or refuses a range
wholly past it (416, ``bytes */TOTAL``).  The backup reads the missing bytes as
zeros, with a warning, and the restored disk is the file's bytes followed by
zeros up to the capacity.  A file longer than the disk, or a short answer that
does not state the file's length, stays an error.
"""

from __future__ import annotations

import json
import os

import pytest

# First: vsphere_helpers skips the module without pyvmomi (and fails under CI instead).
from vsphere_helpers import BLOCK, KiB, MiB, bv, connect, create_vm, init_store, server_args, snapshot_names, write

from engine.vsphere.http_disk import DatastoreHttp, HttpDisk, served_length  # noqa: E402
from engine.vsphere.inventory import flat_file, folder_url  # noqa: E402
from helpers import store_fingerprint  # noqa: E402

CAPACITY = 64 * MiB
FILE_LEN = 20 * MiB + 4099           # ends inside a 64 KiB chunk, not sector-aligned either
SHORT = "-grow-flat-files=false"


def _short_vm(sim, name):
    vm = create_vm(sim, name, [CAPACITY // KiB])
    disk = sim.disks(vm.config)[0]
    assert sim.flat_path(disk).stat().st_size == 0        # vcsim made it empty, and keeps it short
    head, tail = os.urandom(3 * BLOCK + 17), os.urandom(200 * KiB + 3)
    write(sim, disk, 5, head)
    write(sim, disk, FILE_LEN - len(tail), tail)          # data right up to the file's last byte
    assert sim.flat_path(disk).stat().st_size == FILE_LEN
    return vm, disk


def test_short_flat_file_reads_as_zeros_past_its_end(vcsim_factory, tmp_path):
    sim = vcsim_factory(SHORT)
    store, srv = init_store(tmp_path / "store"), server_args(sim)
    vm, disk = _short_vm(sim, "short01")
    source = sim.flat_path(disk).read_bytes()

    proc = bv("vsphere", "backup", store, *srv, "--vm", "short01", "--transport", "http", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sim.flat_path(disk).stat().st_size == FILE_LEN  # the simulator really kept it short
    doc = json.loads(proc.stdout)
    want = f"holds only {FILE_LEN} of the disk's {CAPACITY} bytes"
    assert any(want in w for w in doc["warnings"]), doc["warnings"]
    assert any(want in w for w in doc["disks"][0]["warnings"])
    assert want in proc.stderr and "blockvault: warning:" in proc.stderr
    assert doc["disks"][0]["transport"] == "http" and doc["disks"][0]["capacity"] == CAPACITY

    out = tmp_path / "restored.img"
    restored = bv("restore", store, doc["disks"][0]["backup"], out)
    assert restored.returncode == 0, restored.stderr
    data = out.read_bytes()
    assert len(data) == CAPACITY
    assert data == source + bytes(CAPACITY - FILE_LEN)
    assert snapshot_names(vm) == []


def test_reader_pads_a_chunk_cut_by_the_end_and_ranges_past_it(vcsim_factory):
    """Every request shape against the real server: whole, cut inside a chunk (206), wholly
    past the end (416), and one multi-chunk request spanning the end."""
    sim = vcsim_factory(SHORT)
    vm, disk = _short_vm(sim, "short02")
    source = sim.flat_path(disk).read_bytes()
    expect = source + bytes(CAPACITY - FILE_LEN)
    with connect(sim) as conn:
        url = folder_url("DC0", flat_file(disk.backing.fileName))
        with HttpDisk(DatastoreHttp(conn), url, CAPACITY, lambda: [(0, CAPACITY)], "test disk") as src:
            last = FILE_LEN // BLOCK * BLOCK
            cases = [[0, BLOCK], [last], [last + BLOCK, last + 2 * BLOCK], [32 * MiB],
                     [last - 2 * BLOCK, last - BLOCK, last, last + BLOCK], [CAPACITY - BLOCK]]
            for offsets in cases:
                buf = bytearray(b"\xa5" * (len(offsets) * BLOCK))
                src.read_chunks(offsets, BLOCK, buf)
                for k, off in enumerate(offsets):
                    assert buf[k * BLOCK:(k + 1) * BLOCK] == expect[off:off + BLOCK], (offsets, off)
            assert src.file_length == FILE_LEN
            # The whole disk, as the pipeline would read it in batches.
            offsets = list(range(0, CAPACITY, BLOCK))
            whole = bytearray(CAPACITY)
            for i in range(0, len(offsets), 32):
                src.read_chunks(offsets[i:i + 32], BLOCK, memoryview(whole)[i * BLOCK:(i + 32) * BLOCK])
            assert whole == expect


def test_flat_file_longer_than_the_disk_is_an_error(vcsim, tmp_path):
    store, srv = init_store(tmp_path / "store"), server_args(vcsim)
    vm = create_vm(vcsim, "long01", [4 * 1024], cbt=True)
    disk = vcsim.disks(vm.config)[0]
    write(vcsim, disk, 4 * MiB - 100, os.urandom(100))
    first = bv("vsphere", "backup", store, *srv, "--vm", "long01", "--transport", "http")
    assert first.returncode == 0, first.stderr
    before = store_fingerprint(store)
    write(vcsim, disk, 0, b"changed" * 10)                # so the next run has something to read
    os.truncate(vcsim.flat_path(disk), 5 * MiB)           # a file that is not this disk's
    proc = bv("vsphere", "backup", store, *srv, "--vm", "long01", "--transport", "http")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"the file is {5 * MiB} bytes, longer than the disk's capacity of {4 * MiB} bytes" in proc.stderr
    assert store_fingerprint(store) == before
    assert snapshot_names(vm) == []


@pytest.mark.parametrize("status,content_range,offset,n,capacity,result", [
    (206, "bytes 0-99/1000", 0, 100, 1000, (100, 1000)),
    (206, "bytes 900-949/950", 900, 100, 1000, (50, 950)),      # cut at the end of a short file
    (416, "bytes */950", 960, 40, 1000, (0, 950)),              # wholly past its end
    (416, "bytes */950", 950, 40, 1000, (0, 950)),
])
def test_served_length_accepts(status, content_range, offset, n, capacity, result):
    assert served_length(status, content_range, offset, n, capacity) == result


@pytest.mark.parametrize("status,content_range,offset,n,capacity,problem", [
    (206, "bytes 900-949/*", 900, 100, 1000, "without stating the file's length"),
    (206, "bytes 0-99/2000", 0, 100, 1000, "the file is 2000 bytes, longer than the disk's capacity of 1000"),
    (206, "bytes 900-999/2000", 900, 100, 1000, "longer than the disk's capacity"),
    (206, "bytes 900-949/951", 900, 100, 1000, "the server sent 'bytes 900-949/951'"),   # length elsewhere
    (206, "bytes 900-949/950", 900, 100, None, "the server sent"),                      # no capacity known
    (206, "bytes 901-949/950", 900, 100, 1000, "the server sent"),
    (206, "", 0, 100, 1000, "the server sent ''"),
    (416, "bytes */1000", 960, 40, 1000, "which is not shorter than the disk's 1000"),
    (416, "bytes */950", 940, 40, 1000, "HTTP 416"),                                   # 940-949 exist
    (416, "", 960, 40, 1000, "without stating the file's length"),
])
def test_served_length_refuses(status, content_range, offset, n, capacity, problem):
    with pytest.raises(ValueError) as info:
        served_length(status, content_range, offset, n, capacity)
    assert problem in str(info.value)
