"""The VDDK transport (native/vddk_*.c) against a stand-in libvixDiskLib, through real dlopen.

The tests build tests/vddk_stub/vixDiskLibStub.c into shared libraries with gcc (a VDDK 8
look-alike under lib64/, a VDDK 6.5 one without QueryAllocatedBlocks, and one that lacks
VixDiskLib_Read) and tests/native/vddk_tool.c + native/vddk_*.c into a program -- under
AddressSanitizer/UBSan when the compiler has them, and once more under ThreadSanitizer for the
concurrent-read test.  Each test lays out a fake datastore under $VDDK_STUB_ROOT, runs the tool,
and checks its JSON output, the bytes it produced, and the stub's call log ($VDDK_STUB_LOG),
where the stub also records every rule of the API its caller broke ("VIOLATION" lines).
"""

import ast
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB_SRC = REPO / "tests" / "vddk_stub" / "vixDiskLibStub.c"
TOOL_SRC = REPO / "tests" / "native" / "vddk_tool.c"
VDDK_SRCS = [REPO / "native" / f"vddk_{part}.c"
             for part in ("library", "access", "disk", "extents")]

SECTOR = 512
CHUNK = 128 * SECTOR  # VIXDISKLIB_MIN_CHUNK_SIZE in bytes
USER = "backup-operator@vsphere.local"
PASSWORD = "Pa55-w0rd-that-must-never-leak"
COOKIE = "vmware_soap_session=cookie-that-must-never-leak"
VM, SNAP, DS_PATH = "vm-42", "snapshot-7", "[ds1] vm42/vm42.vmdk"

# The calls a job makes, in order, without the parameter-block bookkeeping.
JOB_CALLS = {"InitEx", "PrepareForAccess", "ConnectEx", "Open", "GetInfo", "GetTransportMode",
             "QueryAllocatedBlocks", "FreeBlockList", "Read", "Write", "Flush", "Close",
             "Disconnect", "Cleanup", "EndAccess", "Exit"}

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or not sys.platform.startswith("linux"),
                                reason="needs gcc on Linux")


def _gcc(*args):
    subprocess.run(["gcc", *map(str, args)], check=True, capture_output=True, text=True)


def _sanitizer_works(tmp, flags):
    src = tmp / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    try:
        _gcc(*flags, src, "-o", tmp / "probe")
        subprocess.run([tmp / "probe"], check=True, capture_output=True)
        return True
    except (subprocess.CalledProcessError, OSError):
        return False


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile the stub variants and the tool once for the module."""
    out = tmp_path_factory.mktemp("vddk-build")
    stub = ["-shared", "-fPIC", "-fvisibility=hidden", "-O2", "-Wall", "-Wextra", "-Werror"]
    (out / "vddk8" / "lib64").mkdir(parents=True)
    _gcc(*stub, STUB_SRC, "-o", out / "vddk8" / "lib64" / "libvixDiskLib.so.8", "-lpthread")
    (out / "vddk6").mkdir()
    _gcc(*stub, "-DSTUB_VDDK6", STUB_SRC, "-o", out / "vddk6" / "libvixDiskLib.so.6", "-lpthread")
    _gcc(*stub, "-DSTUB_OMIT_READ", STUB_SRC, "-o", out / "libvixDiskLib-noread.so", "-lpthread")

    tool = ["-std=c11", "-g", "-Wall", "-Wextra", "-Werror", "-I", REPO / "native"]
    srcs = [TOOL_SRC, *VDDK_SRCS, "-ldl", "-lpthread"]
    asan = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    if not _sanitizer_works(out, asan):
        asan = []
    _gcc(*tool, "-O1", *asan, *srcs, "-o", out / "vddk_tool")
    tsan = ["-fsanitize=thread"]
    have_tsan = _sanitizer_works(out, tsan)
    if have_tsan:
        _gcc(*tool, "-O1", *tsan, *srcs, "-o", out / "vddk_tool_tsan")
    return {"dir": out, "lib": out / "vddk8", "lib6": out / "vddk6",
            "noread": out / "libvixDiskLib-noread.so", "tool": out / "vddk_tool",
            "tool_tsan": out / "vddk_tool_tsan" if have_tsan else None}


def write_image(path, size, pieces):
    """A sparse raw image of `size` bytes holding `pieces` ({offset: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return path


def sample_pieces(size):
    """Data at the start, unaligned in the middle, across a chunk edge, and in the last sector
    of a capacity that is not a whole number of chunks."""
    rnd = lambda n, seed: bytes((i * 131 + seed * 7 + (i >> 9)) & 0xFF for i in range(n))
    return {0: b"MBR!" * 128, 3 * CHUNK - 700: rnd(1400, 1), 5 * 2**20 + 77: rnd(300_000, 2),
            size - 300: rnd(300, 3)}


def data_ranges(path):
    """The image's data ranges according to SEEK_DATA/SEEK_HOLE."""
    out, fd = [], os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole))
            pos = hole
    finally:
        os.close(fd)
    return out


def merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        elif a < b:
            out.append([a, b])
    return out


def expected_extents(path, chunk_bytes=CHUNK):
    """Allocated areas at chunk granularity, plus the unaligned tail, as [offset, length]."""
    cap = path.stat().st_size
    aligned_end = cap // chunk_bytes * chunk_bytes
    ranges = [(d // chunk_bytes * chunk_bytes, min(-(-h // chunk_bytes) * chunk_bytes, aligned_end))
              for d, h in data_ranges(path)]
    if cap > aligned_end:
        ranges.append((aligned_end, cap))
    return [[a, b - a] for a, b in merge(ranges)]


class Harness:
    """One fake vCenter: a stub root, a log, and the tool's command line."""

    def __init__(self, build, tmp_path):
        self.build = build
        self.root = tmp_path / "datastores"
        self.log = tmp_path / "stub.log"
        self.tmp = tmp_path
        self.env = dict(os.environ, VDDK_STUB_ROOT=str(self.root), VDDK_STUB_LOG=str(self.log),
                        VDDK_STUB_USER=USER, VDDK_STUB_PASSWORD=PASSWORD,
                        VDDK_TOOL_PASSWORD=PASSWORD,
                        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
                        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        for k in ("VDDK_STUB_FAIL", "VDDK_STUB_MODES", "VDDK_STUB_THUMBPRINT", "VDDK_STUB_LEAK",
                  "VDDK_STUB_DELAY_US", "VDDK_TOOL_COOKIE"):
            self.env.pop(k, None)

    def disk(self, snapshot=SNAP, ds_path=DS_PATH):
        ds, rel = ds_path[1:].split("] ", 1)
        return self.root / VM / (snapshot or "current") / ds / rel

    def remote(self, snapshot=SNAP, transports="nbdssl:nbd", identity="blockvault-test",
               disk=DS_PATH, lib=None, user=USER):
        args = ["--lib", lib or self.build["lib"], "--server", "vcenter.example.test",
                "--port", "443", "--thumbprint", "AA:BB:CC", "--vm", VM, "--disk", disk]
        if user:
            args += ["--user", user]
        if snapshot:
            args += ["--snapshot", snapshot]
        if transports:
            args += ["--transports", transports]
        if identity:
            args += ["--identity", identity]
        return args

    def run(self, *args, ok=True, tool=None, env=None):
        cmd = [str(tool or self.build["tool"])] + [str(a) for a in args]
        p = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=300)
        for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "ThreadSanitizer"):
            assert marker not in p.stderr, p.stderr
        if ok:
            assert p.returncode == 0, p.stderr
            return json.loads(p.stdout)
        assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
        return p.stderr

    def lines(self):
        return self.log.read_text().splitlines() if self.log.exists() else []

    def calls(self):
        """The logged calls, in order, one name per call."""
        return [l.split()[0] for l in self.lines() if l and not l.startswith((" ", "VIOLATION"))]

    def job_calls(self):
        """calls() without repetitions of Read/Write and without parameter-block bookkeeping."""
        out = []
        for c in self.calls():
            if c in JOB_CALLS and not (out and out[-1] == c and c in ("Read", "Write")):
                out.append(c)
        return out

    def violations(self):
        return [l for l in self.lines() if l.startswith("VIOLATION")]


@pytest.fixture
def h(build, tmp_path):
    harness = Harness(build, tmp_path)
    yield harness
    assert harness.violations() == [], "the stub saw API misuse"


@pytest.fixture
def image(h):
    size = 64 * 2**20 + 3 * SECTOR  # not a whole number of 64 KiB chunks
    return write_image(h.disk(), size, sample_pieces(size))


# ---- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("handles,threads", [(1, 1), (1, 4), (3, 4)])
def test_dump_of_sparse_image_is_byte_identical(h, image, handles, threads):
    out = h.tmp / "dump.raw"
    r = h.run(*h.remote(), "--handles", handles, "--threads", threads, "--io-sectors", 2048,
              "dump", out)
    assert out.read_bytes() == image.read_bytes()
    assert r["capacity"] == image.stat().st_size
    assert r["bytes_read"] == sum(l for _, l in expected_extents(image))
    assert h.calls().count("InitEx") == 1
    assert h.calls().count("ConnectEx") == handles == h.calls().count("Open")
    assert h.calls().count("Close") == handles == h.calls().count("Disconnect")


def test_concurrent_reads_on_one_handle_are_serialised(h, image):
    """Four threads, one VDDK handle, reads slowed down: the stub would log a VIOLATION if two
    calls ever overlapped on the handle (test_stub_checks_its_callers shows that it does)."""
    out = h.tmp / "dump.raw"
    tool = h.build["tool_tsan"] or h.build["tool"]
    h.run(*h.remote(), "--handles", 1, "--threads", 4, "--io-sectors", 256, "--all", "dump", out,
          tool=tool, env={"VDDK_STUB_DELAY_US": "300"})
    assert out.read_bytes() == image.read_bytes()
    assert h.calls().count("Read") > 4


@pytest.mark.parametrize("offset,length", [
    (0, 1), (1, 1), (511, 2), (100, 1000), (3 * CHUNK - 701, 1402), (5 * 2**20, 4 * 2**20 + 3),
    (64 * 2**20 + 1000, 536),        # ends exactly at the capacity
    (64 * 2**20 + 1000, 5000),       # runs past the capacity: zeros
    (64 * 2**20 + 3 * SECTOR, 10),   # starts at the capacity
    (2**40, 3),                      # far past it
])
def test_unaligned_reads_and_reads_past_capacity(h, image, offset, length):
    out = h.tmp / "read.bin"
    h.run(*h.remote(), "--io-sectors", 16, "read", offset, length, out)
    data = image.read_bytes()[offset:offset + length]
    assert out.read_bytes() == data + bytes(length - len(data))


# ---- extents ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_sectors", [128, 256, 2048])
def test_extents_match_allocated_areas(h, image, chunk_sectors):
    r = h.run(*h.remote(), "--chunk", chunk_sectors, "extents")
    assert r["extents"] == expected_extents(image, chunk_sectors * SECTOR)
    # And, independently of SEEK_DATA: every non-zero byte is inside an extent.
    data = image.read_bytes()
    covered = bytearray(len(data))
    for off, length in r["extents"]:
        covered[off:off + length] = b"\1" * length
    assert all(covered[i] for i in range(len(data)) if data[i])
    assert r["has_allocated_blocks"] is True


def test_extents_of_a_range_are_clipped(h, image):
    full = expected_extents(image)
    lo, hi = 2 * CHUNK + 5, 5 * 2**20 + 4096
    r = h.run(*h.remote(), "extents", lo, hi - lo)
    want = [[max(o, lo), min(o + l, hi) - max(o, lo)] for o, l in full if o < hi and o + l > lo]
    assert r["extents"] == want


def test_extents_query_in_windows_of_at_most_512k_chunks(h):
    """At 128 sectors per chunk one call covers at most 32 GiB; a 33 GiB disk takes two."""
    size = 33 * 2**30
    img = write_image(h.disk(), size, {4096: b"x" * 10, 32 * 2**30 + 5 * 2**20: b"y" * 2**20})
    r = h.run(*h.remote(), "extents")
    assert r["extents"] == expected_extents(img)
    queries = [l for l in h.lines() if l.startswith("QueryAllocatedBlocks")]
    assert queries == ["QueryAllocatedBlocks start=0 n=67108864 chunk=128",
                       "QueryAllocatedBlocks start=67108864 n=2097152 chunk=128"]
    assert h.calls().count("FreeBlockList") == 2


def test_empty_disk_has_no_extents(h):
    img = write_image(h.disk(), 16 * CHUNK, {})
    r = h.run(*h.remote(), "extents")
    assert r["extents"] == []
    out = h.tmp / "dump.raw"
    h.run(*h.remote(), "dump", out)
    assert out.read_bytes() == img.read_bytes()
    assert "Read" not in h.calls()


def test_vddk65_library_without_allocated_blocks(h, image):
    """The 6.7 symbols are optional: without them everything counts as allocated, and the
    VDDK 7 fields of VixDiskLibInfo are not read (ASan would see the 56-byte struct overrun)."""
    r = h.run(*h.remote(lib=h.build["lib6"]), "extents")
    assert r["extents"] == [[0, image.stat().st_size]]
    assert (r["lib_major"], r["has_allocated_blocks"]) == (6, False)
    assert (r["logical_sector_size"], r["physical_sector_size"]) == (0, 0)
    assert "AllocateConnectParams" not in h.calls()
    out = h.tmp / "dump.raw"
    h.run(*h.remote(lib=h.build["lib6"]), "dump", out)
    assert out.read_bytes() == image.read_bytes()


# ---- the job's call sequence -----------------------------------------------------------------

def test_call_sequence(h, image):
    h.run(*h.remote(), "dump", h.tmp / "dump.raw")
    assert (h.tmp / "dump.raw").read_bytes() == image.read_bytes()
    assert h.job_calls() == ["InitEx", "PrepareForAccess", "ConnectEx", "Open", "GetInfo",
                             "GetTransportMode", "QueryAllocatedBlocks", "FreeBlockList", "Read",
                             "Close", "Disconnect", "Cleanup", "EndAccess", "Exit"]
    lines = h.lines()
    assert "ConnectEx readOnly=1 snapshot=snapshot-7 transports=nbdssl:nbd" in lines
    assert f"Open path={DS_PATH} flags=4" in lines  # VIXDISKLIB_FLAG_OPEN_READ_ONLY
    assert "PrepareForAccess identity=blockvault-test" in lines
    assert any(l.startswith("  ConnectEx params vmxSpec=moref=vm-42 server=vcenter.example.test "
                            "port=443 nfcPort=0 thumbprint=AA:BB:CC credType=uid") for l in lines)
    assert any(l.startswith("  Cleanup params vmxSpec=NULL server=vcenter.example.test ")
               for l in lines)
    assert h.calls().count("AllocateConnectParams") == h.calls().count("FreeConnectParams")


def test_log_callbacks_from_vddk_threads_and_noise_demoted(h, image):
    """InitEx's thread logs through the callbacks; VDDK 7's CEIP 'error' is demoted to info."""
    p = subprocess.run([str(h.build["tool"]), *map(str, h.remote()), "info"], env=h.env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "vddk-log info: VixDiskLibStub: background thread running" in p.stderr
    assert "vddk-log info: VDDK_PhoneHome: Get CEIP status failed" in p.stderr


def test_local_connection_uses_file_transport(h, image):
    out = h.tmp / "dump.raw"
    r = h.run("--lib", h.build["lib"], "--disk", image, "dump", out)
    assert r["transport"] == "file"
    assert out.read_bytes() == image.read_bytes()
    assert "  ConnectEx params vmxSpec=NULL server=NULL port=0 nfcPort=0 thumbprint=NULL " \
           "credType=none" in h.lines()
    assert "PrepareForAccess" not in h.calls()


# ---- transport modes -------------------------------------------------------------------------

@pytest.mark.parametrize("requested,supported,used", [
    ("nbdssl:nbd", None, "nbdssl"),
    ("nbd:nbdssl", None, "nbd"),
    ("san:hotadd:nbdssl:nbd", None, "nbdssl"),
    (None, None, "nbd"),                   # VDDK's default list file:san:hotadd:nbd
    ("san:hotadd", None, "nbdssl"),        # only advanced modes, none works: NBDSSL fallback
    ("hotadd:nbd", "hotadd:nbdssl:nbd", "hotadd"),
])
def test_transport_mode_reported(h, image, requested, supported, used):
    env = {"VDDK_STUB_MODES": supported} if supported else {}
    r = h.run(*h.remote(transports=requested), "info", env=env)
    assert r["transport"] == used
    assert f"GetTransportMode -> {used}" in h.lines()


# ---- restore ---------------------------------------------------------------------------------

def test_write_back_reproduces_image(h, image):
    target = write_image(h.disk(snapshot=None), image.stat().st_size, {})
    r = h.run(*h.remote(snapshot=None, transports="nbdssl"), "restore", image)
    assert target.read_bytes() == image.read_bytes()
    assert r["bytes_written"] == sum(b - a for a, b in merge(
        [(d // SECTOR * SECTOR, -(-hl // SECTOR) * SECTOR) for d, hl in data_ranges(image)]))
    assert "ConnectEx readOnly=0 snapshot=NULL transports=nbdssl" in h.lines()
    assert f"Open path={DS_PATH} flags=0" in h.lines()
    assert h.job_calls() == ["InitEx", "PrepareForAccess", "ConnectEx", "Open", "GetInfo",
                             "GetTransportMode", "Write", "Flush", "Close", "Disconnect",
                             "Cleanup", "EndAccess", "Exit"]


def test_write_back_over_old_data_with_zeroed_holes(h, image):
    size = image.stat().st_size
    target = write_image(h.disk(snapshot=None), size, {0: b"\xee" * size})
    h.run(*h.remote(snapshot=None), "--zero-holes", "restore", image)
    assert target.read_bytes() == image.read_bytes()


def test_write_puts_exactly_the_bytes_asked_for(h, image):
    """Writes through VDDK at sector offsets: the disk file holds the new bytes there and its
    old bytes everywhere else, byte for byte."""
    size = image.stat().st_size
    target = write_image(h.disk(snapshot=None), size, {0: image.read_bytes()})
    want = bytearray(image.read_bytes())
    for offset, data in ((0, b"\x01" * SECTOR), (3 * CHUNK - SECTOR, os.urandom(2 * SECTOR + 4 * CHUNK)),
                         (size - 2 * SECTOR, os.urandom(2 * SECTOR))):
        src = h.tmp / "patch.bin"
        src.write_bytes(data)
        r = h.run(*h.remote(snapshot=None), "write", offset, src)
        assert r["bytes_written"] == len(data)
        want[offset:offset + len(data)] = data
        assert target.read_bytes() == want


def test_unaligned_write_is_refused_before_vddk(h, image):
    target = write_image(h.disk(snapshot=None), image.stat().st_size, {})
    src = h.tmp / "small.bin"
    src.write_bytes(b"q" * 512)
    err = h.run(*h.remote(snapshot=None), "write", 100, src, ok=False)
    assert "offset 100 and length 512 must be multiples of 512" in err
    assert f"(vddk_errcode=0, errno={errno.EINVAL})" in err
    assert "Write" not in h.calls()
    err = h.run(*h.remote(snapshot=None), "write", image.stat().st_size, src, ok=False)
    assert "end past the capacity" in err
    assert target.read_bytes() == bytes(image.stat().st_size)  # nothing was written


# ---- errors ----------------------------------------------------------------------------------

def test_missing_disk_file(h, image):
    err = h.run(*h.remote(disk="[ds1] vm42/missing.vmdk"), "info", ok=False)
    assert 'VixDiskLib_Open("[ds1] vm42/missing.vmdk", handle 1 of 1) failed: VDDK error 4 ' \
           "(VIX_E_FILE_NOT_FOUND): A file was not found " \
           f"(vddk_errcode=4, errno={errno.ENOENT})" in err
    # The job is still wound down in order.
    assert h.job_calls() == ["InitEx", "PrepareForAccess", "ConnectEx", "Open", "Disconnect",
                             "Cleanup", "EndAccess", "Exit"]


def test_bad_library_path(h, image):
    err = h.run(*h.remote(lib=h.tmp / "nowhere" / "libvixDiskLib.so.8"), "info", ok=False)
    assert f"cannot load libvixDiskLib: dlopen({h.tmp}/nowhere/libvixDiskLib.so.8) failed:" in err
    assert "No such file or directory" in err
    assert f"(vddk_errcode=0, errno={errno.ENOENT})" in err
    not_elf = h.tmp / "libvixDiskLib.so.8"
    not_elf.write_text("not a library")
    err = h.run(*h.remote(lib=not_elf), "info", ok=False)
    assert f"cannot load libvixDiskLib: dlopen({not_elf}) failed: {not_elf}: " in err  # + dlerror
    assert f"errno={errno.ELIBACC})" in err
    empty = h.tmp / "empty"
    empty.mkdir()
    err = h.run(*h.remote(lib=empty), "info", ok=False)
    assert f"no libvixDiskLib.so{{.8,.7,.6,}} in {empty} or {empty}/lib64" in err
    assert not h.log.exists()


def test_default_library_locations(h, image):
    if any(Path(d).exists() for d in ("/usr/lib/vmware-vix-disklib",
                                      "/usr/local/lib/vmware-vix-disklib",
                                      "/opt/vmware-vix-disklib-distrib")):
        pytest.skip("a VDDK is installed here")
    args = h.remote()
    i = args.index("--lib")
    del args[i:i + 2]
    err = h.run(*args, "info", ok=False)
    assert "not found in /usr/lib/vmware-vix-disklib, /usr/local/lib/vmware-vix-disklib or " \
           "/opt/vmware-vix-disklib-distrib" in err


def test_library_lacking_a_symbol(h, image):
    err = h.run(*h.remote(lib=h.build["noread"]), "info", ok=False)
    assert f"{h.build['noread']} lacks VixDiskLib_Read: VDDK >= 6.5 is required " \
           f"(vddk_errcode=0, errno={errno.ELIBBAD})" in err
    assert not h.log.exists()  # InitEx was never called


def test_read_error_mid_dump(h, image):
    err = h.run(*h.remote(), "--io-sectors", 128, "dump", h.tmp / "dump.raw", ok=False,
                env={"VDDK_STUB_FAIL": "Read:14011:3"})
    assert "VixDiskLib_Read([ds1] vm42/vm42.vmdk, start sector " in err
    assert "failed: VDDK error 14011 (VIX_E_HOST_TCP_CONN_LOST): The network connection to the " \
           f"host was lost (vddk_errcode=14011, errno={errno.ECONNRESET})" in err
    calls = h.job_calls()
    assert calls[-5:] == ["Close", "Disconnect", "Cleanup", "EndAccess", "Exit"]


def test_query_allocated_blocks_error(h, image):
    err = h.run(*h.remote(), "extents", ok=False,
                env={"VDDK_STUB_FAIL": "QueryAllocatedBlocks:16002"})
    assert "VixDiskLib_QueryAllocatedBlocks([ds1] vm42/vm42.vmdk, start sector 0, 131072 " \
           "sectors, chunk 128) failed: VDDK error 16002 (VIX_E_DISK_NOIO): The disk could " \
           "not be read or written" in err


def test_thumbprint_mismatch_shows_as_open_failure(h, image):
    err = h.run(*h.remote(), "info", ok=False, env={"VDDK_STUB_THUMBPRINT": "11:22:33"})
    assert 'VixDiskLib_Open("[ds1] vm42/vm42.vmdk", handle 1 of 1) failed: VDDK error 1 ' \
           f"(VIX_E_FAIL): Unknown error (vddk_errcode=1, errno={errno.EIO})" in err


def test_transport_not_available(h, image):
    err = h.run(*h.remote(transports="file"), "info", ok=False)
    assert "VDDK error 6 (VIX_E_NOT_SUPPORTED): The operation is not supported " \
           f"(vddk_errcode=6, errno={errno.ENOTSUP})" in err


def test_bad_arguments_are_caught_before_vddk(h, image):
    err = h.run(*h.remote(), "--chunk", 64, "extents", ok=False)
    assert "chunk_sectors 64 is below VDDK's minimum of 128" in err
    err = h.run(*h.remote(user=None, identity=None), "info", ok=False)
    assert "connecting to vcenter.example.test needs vm_moref, user and password " \
           "(user missing)" in err
    assert "ConnectEx" not in h.calls()
    err = h.run(*h.remote(identity="x" * 51), "info", ok=False)
    assert "VixDiskLib_PrepareForAccess: identity must be 1 to 50 characters" in err


# ---- credentials -----------------------------------------------------------------------------

def test_credentials_never_in_log_or_messages(h, image):
    outputs = []
    p = subprocess.run([str(h.build["tool"]), *map(str, h.remote()), "info"], env=h.env,
                       capture_output=True, text=True)
    assert p.returncode == 0
    outputs += [p.stdout, p.stderr]
    # Authentication failure, an Open failure, a Read failure.
    outputs.append(h.run(*h.remote(), "info", ok=False,
                         env={"VDDK_STUB_PASSWORD": "something-else"}))
    outputs.append(h.run(*h.remote(disk="[ds1] nope.vmdk"), "info", ok=False))
    outputs.append(h.run(*h.remote(), "dump", h.tmp / "d.raw", ok=False,
                         env={"VDDK_STUB_FAIL": "Read:7"}))
    # Session-cookie login: credType SESSIONID with user and password as key.
    r = h.run(*h.remote(), "info", env={"VDDK_TOOL_COOKIE": COOKIE})
    outputs.append(json.dumps(r))
    assert any("credType=sessionid" in l for l in h.lines())

    assert "VDDK error 35 (VIX_E_AUTHENTICATION_FAIL): Authentication failure " \
           f"(vddk_errcode=35, errno={errno.EACCES})" in outputs[2]
    for text in outputs + [h.log.read_text()]:
        for secret in (PASSWORD, USER, COOKIE, "backup-operator"):
            assert secret not in text


def test_credentials_struck_from_texts_a_library_repeats(h, image):
    """VDDK_STUB_LEAK: the library repeats the user name and password in every error text and in
    warnings it logs (as a careless or debug build may).  None of it may reach the output, on
    any path: success, wrong password, a disk that is not there, a failed read, a cookie login."""
    leak = {"VDDK_STUB_LEAK": "1"}
    ok = subprocess.run([str(h.build["tool"]), *map(str, h.remote()), "info"], env={**h.env, **leak},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    outputs = {"success": ok.stdout + ok.stderr,
               "wrong password": h.run(*h.remote(), "info", ok=False,
                                       env={**leak, "VDDK_STUB_PASSWORD": "something-else"}),
               "open failure": h.run(*h.remote(disk="[ds1] nope.vmdk"), "info", ok=False, env=leak),
               "read failure": h.run(*h.remote(), "dump", h.tmp / "d.raw", ok=False,
                                     env={**leak, "VDDK_STUB_FAIL": "Read:7"}),
               "cookie login": h.run(*h.remote(), "info", ok=False,
                                     env={**leak, "VDDK_TOOL_COOKIE": COOKIE, "VDDK_STUB_FAIL": "Open:1"})}
    for what, text in outputs.items():
        for secret in (PASSWORD, USER, COOKIE, "something-else"):
            assert secret not in text, (what, secret, text)
    assert PASSWORD not in h.log.read_text()
    # The library did repeat them, struck out: the check above means something.
    assert "vddk-log warning: VixDiskLibStub: connecting to vcenter.example.test [session user=*** " \
           "password=***]" in outputs["success"]
    assert "(VIX_E_AUTHENTICATION_FAIL): Authentication failure [session user=*** password=***]" \
        in outputs["wrong password"]
    assert "A file was not found [session user=*** password=***]" in outputs["open failure"]
    assert "VixDiskLibStub: cannot open [ds1] nope.vmdk [session user=*** password=***]" \
        in outputs["open failure"]


# ---- the stub itself -------------------------------------------------------------------------

STUB_CHECKS = textwrap.dedent(r"""
    import ctypes, sys, threading
    lib = ctypes.CDLL(sys.argv[1])
    u64, vp = ctypes.c_uint64, ctypes.c_void_p
    LOG = ctypes.CFUNCTYPE(None, ctypes.c_char_p, vp)
    cb = LOG(lambda fmt, args: None)
    for name, restype, argtypes in [
        ("InitEx", u64, [ctypes.c_uint32, ctypes.c_uint32, LOG, LOG, LOG, ctypes.c_char_p,
                         ctypes.c_char_p]),
        ("ConnectEx", u64, [vp, ctypes.c_char, ctypes.c_char_p, ctypes.c_char_p,
                            ctypes.POINTER(vp)]),
        ("Open", u64, [vp, ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(vp)]),
        ("Read", u64, [vp, u64, u64, ctypes.c_char_p]),
        ("QueryAllocatedBlocks", u64, [vp, u64, u64, u64, ctypes.POINTER(vp)]),
        ("FreeBlockList", u64, [vp]), ("Close", u64, [vp]), ("Disconnect", u64, [vp]),
        ("Exit", None, [])]:
        f = getattr(lib, "VixDiskLib_" + name)
        f.restype, f.argtypes = restype, argtypes
    conn, h, bl = vp(), vp(), vp()
    buf = ctypes.create_string_buffer(64 * 512)
    r = {}
    r["open_before_init"] = lib.VixDiskLib_Open(None, b"/x", 4, ctypes.byref(h))
    r["init"] = lib.VixDiskLib_InitEx(6, 5, cb, cb, cb, None, None)
    r["init_twice"] = lib.VixDiskLib_InitEx(6, 5, cb, cb, cb, None, None)
    r["open_before_connect"] = lib.VixDiskLib_Open(None, sys.argv[2].encode(), 4, ctypes.byref(h))
    params = ctypes.create_string_buffer(128)   # all zero: a local connection
    r["connect"] = lib.VixDiskLib_ConnectEx(params, 1, None, None, ctypes.byref(conn))
    r["open"] = lib.VixDiskLib_Open(conn, sys.argv[2].encode(), 4, ctypes.byref(h))
    r["read_past_capacity"] = lib.VixDiskLib_Read(h, 131072, 4, buf)
    r["read_last_sectors"] = lib.VixDiskLib_Read(h, 131072, 3, buf)
    r["qab_small_chunk"] = lib.VixDiskLib_QueryAllocatedBlocks(h, 0, 128, 64, ctypes.byref(bl))
    r["qab_unaligned"] = lib.VixDiskLib_QueryAllocatedBlocks(h, 64, 128, 128, ctypes.byref(bl))
    r["qab"] = lib.VixDiskLib_QueryAllocatedBlocks(h, 0, 1024, 128, ctypes.byref(bl))
    r["num_blocks"] = ctypes.cast(bl, ctypes.POINTER(ctypes.c_uint32))[0]
    r["free_bogus_list"] = lib.VixDiskLib_FreeBlockList(ctypes.addressof(buf))
    r["free_list"] = lib.VixDiskLib_FreeBlockList(bl)
    results = []
    def reader():
        results.append(lib.VixDiskLib_Read(h, 0, 64, ctypes.create_string_buffer(64 * 512)))
    ts = [threading.Thread(target=reader) for _ in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    r["concurrent_busy"] = results.count(5)
    r["disconnect_with_open_handle"] = lib.VixDiskLib_Disconnect(conn)
    r["close"] = lib.VixDiskLib_Close(h)
    r["double_close"] = lib.VixDiskLib_Close(h)
    r["disconnect"] = lib.VixDiskLib_Disconnect(conn)
    lib.VixDiskLib_Exit()
    print(r)
""")


def test_stub_checks_its_callers(h, image):
    """The stub, driven directly through ctypes, refuses what the real library forbids."""
    script = h.tmp / "stub_checks.py"
    script.write_text(STUB_CHECKS)
    p = subprocess.run([sys.executable, str(script), str(h.build["lib"] / "lib64" /
                        "libvixDiskLib.so.8"), str(image)],
                       env={**h.env, "VDDK_STUB_DELAY_US": "200000"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = ast.literal_eval(p.stdout)
    # Four threads enter Read on one handle while the first sleeps 200 ms: at least one of
    # them must be turned away with VIX_E_OBJECT_IS_BUSY (how many depends on thread start-up).
    assert r.pop("concurrent_busy") >= 1
    assert r == {"open_before_init": 16001, "init": 0, "init_twice": 1,
                 "open_before_connect": 16054, "connect": 0, "open": 0,
                 "read_past_capacity": 16007, "read_last_sectors": 0, "qab_small_chunk": 3,
                 "qab_unaligned": 3, "qab": 0, "num_blocks": 2, "free_bogus_list": 3,
                 "free_list": 0, "disconnect_with_open_handle": 5,
                 "close": 0, "double_close": 1000, "disconnect": 0}
    v = h.violations()
    assert any("concurrent calls on one handle" in l for l in v)
    assert any("double Close" in l for l in v)
    assert any("Open before ConnectEx" in l for l in v)
    h.log.unlink()  # these violations were the point; the fixture checks for none
