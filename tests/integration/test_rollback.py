"""Rollback restores (issue 11 item 4): a target that holds one point is turned
into another by writing only the chunks that differ, in both modes
(--rollback-from: the manifests compared; --rollback-compare: the target read
and hashed), onto a raw file, a loop block device and a vddk:// disk served
by the stand-in VDDK library.  Every result is compared byte for byte with a
full restore of the same point, and the chunk counts are asserted exactly:
the changes are made chunk by chunk, so which chunks differ is known.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import jsonshape
from engine.manifest import SEGMENT_CHUNKS
from helpers import REPO_ROOT, allocated_ranges, rng, run_cli, same_file, write_at

CS = 64 << 10
N = 2100                      # chunks: segments of 1024, 1024 and 52
SIZE = N * CS
SEGMENTS = -(-N // SEGMENT_CHUNKS)
STUB_SRC = os.path.join(REPO_ROOT, "tests", "vddk_stub", "vixDiskLibStub.c")
PASSWORD = "S3cret-pa55word!"


def _copy(src: str, dst: str) -> None:
    """A sparse copy (the machine's disk is shared: holes stay holes)."""
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


@pytest.fixture(autouse=True)
def _cleanup(tmp_path):
    """Each test's images are removed when it ends (a run would otherwise keep gigabytes)."""
    yield
    for name in os.listdir(tmp_path):
        path = os.path.join(tmp_path, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _base_image(path: str, r) -> None:
    """Three of every eight chunks hold data (random: each chunk distinct), the rest are holes."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(N):
            if i % 8 < 3:
                f.seek(i * CS)
                f.write(r.bytes(CS))


def _change(path: str, r, level: int) -> tuple[set[int], set[int]]:
    """Change ``level`` percent of the chunks, each within itself; returns (changed, made zero)."""
    if level == 100:
        changed = set(range(N))
    elif level == 1:  # segments 0 and 2 only: segment 1 stays equal, so it costs nothing
        pool = [i for i in range(N) if i < SEGMENT_CHUNKS or i >= 2 * SEGMENT_CHUNKS]
        changed = set(r.choice(pool, size=N // 100, replace=False).tolist())
    else:
        changed = set(r.choice(N, size=N * level // 100, replace=False).tolist())
    zeroed = set()
    for i in sorted(changed):
        if level == 10 and i % 8 < 3 and i % 3 == 0:  # data chunks that become zero chunks
            write_at(path, i * CS, bytes(CS))
            zeroed.add(i)
        else:
            write_at(path, i * CS + int(r.integers(0, CS - 100)), r.bytes(100))
    return changed, zeroed


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    """One store; disks c1, c10 and c100, each with @1 and @2 = @1 plus 1%, 10% or 100% of its
    chunks changed; full restores of every point (the references) and the changed chunks."""
    tmp = tmp_path_factory.mktemp("rollback")
    store = str(tmp / "store")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    r = rng(11)
    out = {"store": store, "tmp": tmp}
    for level in (1, 10, 100):
        img = str(tmp / f"c{level}.img")
        _base_image(img, r)
        assert run_cli("backup", store, img, "--disk", f"c{level}").returncode == 0
        changed, zeroed = _change(img, r, level)
        proc = run_cli("backup", store, img, "--disk", f"c{level}", "--mode", "incremental")
        assert proc.returncode == 0, proc.stderr
        refs = {}
        for seq in (1, 2):
            ref = str(tmp / f"ref-c{level}-{seq}.img")
            assert run_cli("restore", store, f"c{level}@{seq}", ref).returncode == 0
            refs[seq] = ref
        out[level] = dict(changed=changed, zeroed=zeroed, refs=refs)
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


def _chunks_allocated(path: str) -> int:
    """Chunks of a file that meet an allocated extent (what --rollback-compare reads of it)."""
    chunks = set()
    for start, length in allocated_ranges(path):
        chunks.update(range(start // CS, -(-(start + length) // CS)))
    return len(chunks)


def _expect_counts(doc: dict, changed: set[int], mode: str, read: int = SIZE) -> None:
    assert not jsonshape.check(doc, "restore"), jsonshape.check(doc, "restore")  # docs/JSON.md
    rb = doc["rollback"]
    assert doc["chunks_written"] == len(changed)
    assert doc["bytes_written"] == len(changed) * CS
    assert rb["chunks"] == N and rb["chunks_skipped"] == N - len(changed)
    touched = {i // SEGMENT_CHUNKS for i in changed}
    if mode == "from":
        assert rb["mode"] == "from" and rb["segments_skipped"] == SEGMENTS - len(touched)
        assert rb["chunks_compared"] == sum(min(SEGMENT_CHUNKS, N - s * SEGMENT_CHUNKS) for s in touched)
        assert rb["chunks_sampled"] == 8 and rb["target_bytes_read"] == 8 * CS
    else:
        assert rb["mode"] == "compare" and rb["base"] is None
        assert rb["chunks_compared"] == N and rb["target_bytes_read"] == read
        assert rb["segments_skipped"] == 0 and rb["chunks_sampled"] == 0


def _options(mode: str, base: str) -> list[str]:
    return ["--rollback-from", base] if mode == "from" else ["--rollback-compare"]


@pytest.mark.parametrize("level", [1, 10, 100])
@pytest.mark.parametrize("mode", ["from", "compare"])
@pytest.mark.parametrize("direction", ["back", "forward"])
def test_rollback_of_a_raw_file(points, tmp_path, level, mode, direction):
    p = points[level]
    new, old = (1, 2) if direction == "back" else (2, 1)
    target = str(tmp_path / "disk.img")
    _copy(p["refs"][old], target)
    allocated = _chunks_allocated(target)
    assert allocated < N or level == 100                  # the holes of a sparse file are not read
    proc = run_cli("restore", points["store"], f"c{level}@{new}", target, *_options(mode, f"c{level}@{old}"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert same_file(target, p["refs"][new])              # what a full restore of the point writes
    _expect_counts(doc, p["changed"], mode, read=allocated * CS)
    assert doc["id"] == f"c{level}@{new}" and doc["target"] == target
    if direction == "forward" and p["zeroed"]:            # data chunks that became zero are holes again
        data = allocated_ranges(target)
        for i in p["zeroed"]:
            assert not any(s < (i + 1) * CS and s + n > i * CS for s, n in data), f"chunk {i} still allocated"
    # as sparse as the full restore: zero 4 KiB blocks inside the chunks written are holes too
    assert allocated_ranges(target) == allocated_ranges(p["refs"][new])


def test_text_summary_names_what_was_written_and_skipped(points, tmp_path):
    target = str(tmp_path / "disk.img")
    _copy(points[1]["refs"][2], target)
    proc = run_cli("restore", points["store"], "c1@1", target, "--rollback-from", "c1@2")
    assert proc.returncode == 0 and proc.stdout == ""
    changed = len(points[1]["changed"])
    assert f"(rollback from c1@2)" in proc.stderr
    assert f"wrote {changed} of {N} chunks" in proc.stderr and f"{N - changed} skipped as equal" in proc.stderr
    assert "1 segment equal" in proc.stderr


# -- block devices ----------------------------------------------------------------


@pytest.fixture
def loop(tmp_path):
    """attach(path) -> a loop device over that file; detached at teardown."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    attached = []

    def attach(backing: str) -> str:
        proc = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {proc.stderr.strip()}")
        attached.append(proc.stdout.strip())
        return attached[-1]

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=True)


def _backing(tmp_path, source: str, extra: int = 0, fill: bytes = b"\xaa") -> str:
    """A device's backing file: ``source`` written whole (no holes), then ``extra`` bytes of ``fill``."""
    path = str(tmp_path / "backing.img")
    with open(source, "rb") as src, open(path, "wb") as f:
        while block := src.read(4 << 20):
            f.write(block)
        f.write(fill * extra)
    return path


def _head(path: str, n: int = SIZE) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@pytest.mark.parametrize("level", [1, 10, 100])
@pytest.mark.parametrize("mode", ["from", "compare"])
def test_rollback_of_a_loop_device(points, tmp_path, loop, level, mode):
    p = points[level]
    backing = _backing(tmp_path, p["refs"][2], extra=1 << 20)  # a device larger than the disk
    dev = loop(backing)
    refused = run_cli("restore", points["store"], f"c{level}@1", dev, *_options(mode, f"c{level}@2"))
    assert refused.returncode == 1 and "--force" in refused.stderr
    proc = run_cli("restore", points["store"], f"c{level}@1", dev, "--force", *_options(mode, f"c{level}@2"),
                   "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    _expect_counts(doc, p["changed"], mode)
    assert _head(backing) == _head(p["refs"][1])         # zero chunks written as zeros, the rest as restored
    assert _head(dev) == _head(p["refs"][1])
    with open(backing, "rb") as f:                        # past the disk's end: as it was
        f.seek(SIZE)
        assert f.read() == b"\xaa" * (1 << 20)
    assert any("last 1048576 bytes are left" in w for w in doc["warnings"])


def test_a_device_too_small_for_the_point_is_refused(points, tmp_path, loop):
    """c1@2 of a smaller disk on a device of its size: rolling it to c1@1's larger size is refused."""
    store, tmp = points["store"], points["tmp"]
    img = str(tmp_path / "small.img")
    _copy(points[1]["refs"][1], img)
    with open(img, "r+b") as f:
        f.truncate(SIZE - 4 * CS)
    assert run_cli("backup", store, img, "--disk", "shrunk-dev").returncode == 0
    _copy(points[1]["refs"][1], img)
    assert run_cli("backup", store, img, "--disk", "shrunk-dev").returncode == 0  # @2: the larger size
    with open(img, "r+b") as f:
        f.truncate(SIZE - 4 * CS)
    backing = _backing(tmp_path, img)
    dev = loop(backing)
    before = _head(backing)
    proc = run_cli("restore", store, "shrunk-dev@2", dev, "--force", "--rollback-from", "shrunk-dev@1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"holds {SIZE - 4 * CS} bytes" in proc.stderr and f"needs {SIZE}" in proc.stderr
    assert _head(backing) == before


# -- vddk:// -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vddk(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    tmp = tmp_path_factory.mktemp("vddk")
    lib = tmp / "vddk" / "lib64"
    lib.mkdir(parents=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-o",
                    str(lib / "libvixDiskLib.so.8"), STUB_SRC, "-lpthread"], check=True)
    root = tmp / "datastores"
    disk = root / "vm-77" / "current" / "ds1" / "new" / "new.vmdk"
    disk.parent.mkdir(parents=True)
    env = dict(os.environ, VDDK_STUB_ROOT=str(root), VDDK_STUB_LOG=str(tmp / "vddk.log"),
               VDDK_STUB_USER="backup", VDDK_STUB_PASSWORD=PASSWORD,
               BLOCKVAULT_VSPHERE_USER="backup", BLOCKVAULT_VSPHERE_PASSWORD=PASSWORD)
    url = f"vddk://vc.lab/vm-77?disk=[ds1] new/new.vmdk&library={tmp / 'vddk'}"
    yield dict(env=env, url=url, disk=str(disk), log=tmp / "vddk.log")
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("level", [1, 10, 100])
@pytest.mark.parametrize("mode", ["from", "compare"])
def test_rollback_of_a_vddk_disk(points, vddk, level, mode):
    p = points[level]
    with open(p["refs"][2], "rb") as src, open(vddk["disk"], "wb") as f:  # a VM disk holding c@2
        while block := src.read(4 << 20):
            f.write(block)
    proc = run_cli("restore", points["store"], f"c{level}@1", vddk["url"], "--force",
                   *_options(mode, f"c{level}@2"), "--json", env=vddk["env"])
    assert proc.returncode == 0, proc.stderr
    _expect_counts(json.loads(proc.stdout), p["changed"], mode)
    assert same_file(vddk["disk"], p["refs"][1])
    log = vddk["log"].read_text()
    assert "VIOLATION" not in log and PASSWORD not in log


# -- sizes -----------------------------------------------------------------------


SMALL = SIZE - 3 * CS - 100  # g@1: its last chunk (2096, a data chunk) is partial


@pytest.fixture(scope="module")
def resized(points):
    """Disk g: g@1 of SMALL bytes, g@2 grown to SIZE with data in chunk N - 2 only."""
    store, tmp = points["store"], points["tmp"]
    img = str(tmp / "g.img")
    _copy(points[10]["refs"][1], img)
    with open(img, "r+b") as f:
        f.truncate(SMALL)
    assert run_cli("backup", store, img, "--disk", "g").returncode == 0
    with open(img, "r+b") as f:
        f.truncate(SIZE)
    write_at(img, SIZE - 2 * CS, b"grown" * 1000)
    assert run_cli("backup", store, img, "--disk", "g", "--mode", "incremental").returncode == 0
    refs = {}
    for seq in (1, 2):
        refs[seq] = str(tmp / f"ref-g-{seq}.img")
        assert run_cli("restore", store, f"g@{seq}", refs[seq]).returncode == 0
    assert os.path.getsize(refs[1]) == SMALL
    return refs


@pytest.mark.parametrize("mode", ["from", "compare"])
@pytest.mark.parametrize("new,old", [(2, 1), (1, 2)])
def test_a_file_grows_or_shrinks_to_the_points_size(points, resized, tmp_path, mode, new, old):
    """A file is resized to the point's size: growing reads as zeros past the old end, so only
    the chunk with new data is written (the old partial chunk matches: its tail was zeros);
    shrinking cuts the file and writes nothing (the new partial chunk is the old one's head)."""
    target = str(tmp_path / "g.img")
    _copy(resized[old], target)
    proc = run_cli("restore", points["store"], f"g@{new}", target, *_options(mode, f"g@{old}"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, resized[new])
    doc = json.loads(proc.stdout)
    assert doc["chunks_written"] == (1 if new == 2 else 0)
    assert doc["rollback"]["chunks"] == (N if new == 2 else -(-SMALL // CS))


@pytest.mark.parametrize("mode", ["from", "compare"])
def test_a_device_larger_than_the_base_gets_every_chunk_past_the_bases_end(points, resized, tmp_path, loop, mode):
    """On a device the bytes past the base's end are whatever it held (not zeros, as in a
    resized file), so the chunks from the base's partial last chunk on are all written."""
    backing = _backing(tmp_path, resized[1], extra=SIZE + (1 << 20) - SMALL)
    dev = loop(backing)
    if mode == "compare":  # the device holds g@1: its bytes past g@1's end are not g@1's, and do not count
        proc = run_cli("restore", points["store"], "g@1", dev, "--force", "--rollback-compare", "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["chunks_written"] == 0
    proc = run_cli("restore", points["store"], "g@2", dev, "--force", *_options(mode, "g@1"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert _head(backing) == _head(resized[2])
    assert json.loads(proc.stdout)["chunks_written"] == N - SMALL // CS


# -- refusals ------------------------------------------------------------------------


def test_a_file_that_does_not_hold_the_base_is_refused_before_anything_is_written(points, tmp_path):
    store = points["store"]
    target = str(tmp_path / "other.img")
    with open(target, "wb") as f:                         # the right size, other bytes
        f.write(b"\xaa" * SIZE)
    proc = run_cli("restore", store, "c10@1", target, "--rollback-from", "c10@2", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["error"]["code"] == "bad_input"
    assert "does not hold c10@2" in proc.stderr and "nothing was written" in proc.stderr
    assert "--rollback-compare" in proc.stderr
    with open(target, "rb") as f:
        assert f.read() == b"\xaa" * SIZE
    # --rollback-compare assumes nothing and is right anyway
    proc = run_cli("restore", store, "c10@1", target, "--rollback-compare", "--json")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, points[10]["refs"][1])

    short = str(tmp_path / "short.img")
    _copy(points[10]["refs"][2], short)
    with open(short, "r+b") as f:
        f.truncate(SIZE - CS)
    proc = run_cli("restore", store, "c10@1", short, "--rollback-from", "c10@2")
    assert proc.returncode == 1 and f"holds {SIZE - CS} bytes" in proc.stderr and "does not hold c10@2" in proc.stderr
    assert os.path.getsize(short) == SIZE - CS


def test_a_target_changed_since_its_point_is_caught_by_sampling_or_repaired_by_compare(points, tmp_path):
    """The VM ran after c10@2: chunks changed that c10@1 and c10@2 share.  A rollback from c10@2
    would leave them; a sample of every data chunk finds them, and --rollback-compare repairs them."""
    store = points["store"]
    target = str(tmp_path / "ran.img")
    _copy(points[10]["refs"][2], target)
    shared = [i for i in range(N) if i % 8 < 3 and i not in points[10]["changed"]][:5]
    for i in shared:
        write_at(target, i * CS + 7, b"the VM wrote this")
    with open(target, "rb") as f:
        before = f.read()
    proc = run_cli("restore", store, "c10@1", target, "--rollback-from", "c10@2", "--verify-target", "4096")
    assert proc.returncode == 1 and "does not hold c10@2" in proc.stderr, proc.stderr
    with open(target, "rb") as f:
        assert f.read() == before
    proc = run_cli("restore", store, "c10@1", target, "--rollback-compare", "--json")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, points[10]["refs"][1])
    assert json.loads(proc.stdout)["chunks_written"] == len(points[10]["changed"]) + len(shared)


def test_a_half_done_rollback_is_finished_by_running_it_again(points, tmp_path):
    """What an interrupted rollback leaves: some changed chunks already hold the new point.  The
    sample accepts them (they match the point being restored), and the rest is written."""
    store, p = points["store"], points[10]
    target = str(tmp_path / "half.img")
    _copy(p["refs"][2], target)
    with open(p["refs"][1], "rb") as ref:
        done = sorted(p["changed"])[::2]
        for i in done:
            ref.seek(i * CS)
            write_at(target, i * CS, ref.read(CS))
    proc = run_cli("restore", store, "c10@1", target, "--rollback-from", "c10@2", "--verify-target", "4096",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, p["refs"][1])
    assert json.loads(proc.stdout)["chunks_written"] == len(p["changed"])  # the manifests cannot tell


def test_a_rollback_stopped_by_a_read_error_says_the_target_is_a_mix(points, tmp_path):
    """A pack of c100@1's later chunks fails to read (EIO, tests/faults): the chunks before it
    are written, then the rollback stops and says what the target now is."""
    from engine.manifest import segment_array
    from engine.repository import Repository
    store, p = points["store"], points[100]
    target = str(tmp_path / "mix.img")
    _copy(p["refs"][2], target)
    with Repository.open(store) as repo, repo.store.read_txn() as txn:
        rec = repo.catalog.resolve(txn, "c100@1")
        m = repo.manifests.get(txn, rec.key, rec.id, rec)
        last = segment_array(repo.manifests.segment(txn, m.segments[-1]), m.digest_len)[0].tobytes()
        entry = repo.store.require(txn, last)  # chunk 2048, a data chunk of c100@1 only
        st = os.stat(repo.store.pack_path(entry.pack_id))
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO_ROOT, "tests", "faults"),
           "BLOCKVAULT_TEST_EIO": f"{st.st_dev}:{st.st_ino}:{entry.offset}:{entry.offset + 1}"}
    proc = run_cli("restore", store, "c100@1", target, "--rollback-from", "c100@2", "--json", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "now holds a mix of c100@2 and c100@1" in proc.stderr and "run the same rollback again" in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "os_error"
    proc = run_cli("restore", store, "c100@1", target, "--rollback-from", "c100@2")
    assert proc.returncode == 0, proc.stderr
    assert same_file(target, p["refs"][1])


def test_bad_usage(points, tmp_path):
    store = points["store"]
    target = str(tmp_path / "t.img")
    _copy(points[1]["refs"][2], target)
    cases = [
        (["--rollback-from", "c1@2", "--rollback-compare"], 2, "not allowed with"),
        (["--rollback-from", "c10@2"], 2, "is a point of disk c10"),
        (["--verify-target", "3"], 2, "--verify-target"),
        (["--rollback-from", "c1@2", "--verify-target", "-1"], 2, "--verify-target"),
        (["--rollback-compare", "--zeroed-target"], 2, "--zeroed-target"),
        (["--rollback-compare", "--mode", "0644"], 2, "--mode"),
        (["--rollback-from", "c1@9"], 1, "c1@9"),
    ]
    with open(target, "rb") as f:
        before = f.read()
    for options, code, text in cases:
        proc = run_cli("restore", store, "c1@1", target, *options)
        assert proc.returncode == code and text in proc.stderr and "Traceback" not in proc.stderr, (options, proc)
    with open(target, "rb") as f:
        assert f.read() == before
    missing = str(tmp_path / "missing.img")
    proc = run_cli("restore", store, "c1@1", missing, "--rollback-compare")
    assert proc.returncode == 1 and "does not exist" in proc.stderr and not os.path.exists(missing)
    vmdk = str(tmp_path / "t.vmdk")
    _copy(target, vmdk)
    proc = run_cli("restore", store, "c1@1", vmdk, "--rollback-from", "c1@2")
    assert proc.returncode == 1 and "restore it whole" in proc.stderr


# -- interrupted -----------------------------------------------------------------------


def _vddk_holding(vddk: dict, image: str) -> None:
    with open(image, "rb") as src, open(vddk["disk"], "wb") as f:
        while block := src.read(4 << 20):
            f.write(block)


def test_a_vddk_write_failure_part_way_leaves_a_mix_that_a_second_rollback_finishes(points, vddk):
    """VDDK Write fails from its 20th call on (the stand-in's VDDK_STUB_FAIL): the chunks
    before are written, the error says the disk is a mix, and the same rollback finishes it."""
    p = points[100]
    _vddk_holding(vddk, p["refs"][2])
    env = dict(vddk["env"], VDDK_STUB_FAIL="Write:1:20")
    proc = run_cli("restore", points["store"], "c100@1", vddk["url"], "--force", "--rollback-from", "c100@2",
                   "--threads", "1", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "now holds a mix of c100@2 and c100@1" in proc.stderr, proc.stderr
    mixed = _head(vddk["disk"])
    assert mixed != _head(p["refs"][2]) and mixed != _head(p["refs"][1])  # some chunks written, not all
    proc = run_cli("restore", points["store"], "c100@1", vddk["url"], "--force", "--rollback-from", "c100@2",
                   env=vddk["env"])
    assert proc.returncode == 0, proc.stderr
    assert same_file(vddk["disk"], p["refs"][1])


def test_a_rollback_stopped_by_sigterm_says_the_target_is_a_mix(points, vddk):
    """SIGTERM once the stand-in's log shows writes (each I/O slowed to 5 ms): exit 143, and the
    message says the disk may be a mix; --rollback-compare then finishes the job."""
    import signal
    import sys
    import time
    p = points[100]
    _vddk_holding(vddk, p["refs"][2])
    log = vddk["log"]
    log.write_text("")
    env = dict(vddk["env"], VDDK_STUB_DELAY_US="5000")
    child = subprocess.Popen([sys.executable, "-m", "engine.cli", "restore", points["store"], "c100@1", vddk["url"],
                              "--force", "--rollback-from", "c100@2"], cwd=REPO_ROOT, env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while "\nWrite" not in log.read_text() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, stderr
    assert "rollback aborted" in stderr and "may now hold a mix of c100@2 and c100@1" in stderr, stderr
    assert "Traceback" not in stderr
    proc = run_cli("restore", points["store"], "c100@1", vddk["url"], "--force", "--rollback-compare",
                   env=vddk["env"])
    assert proc.returncode == 0, proc.stderr
    assert same_file(vddk["disk"], p["refs"][1])
