"""native/vmdk.c against qemu-img, through the C driver tests/native/vmdk_tool.c.

The reader must return exactly what `qemu-img convert -O raw` returns for every
hosted VMDK kind qemu-img writes (and for a VMware-style streamOptimized file
with its grain directory in the footer, built here), list allocated extents
that cover every non-zero byte, and turn every corrupt file into an error
message and exit status, never a sanitizer report.  The writer's files must
pass `qemu-img check` and convert back to the bytes written.

Needs gcc, zlib1g-dev and qemu-utils (qemu-img, qemu-io).  Without them the
tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
SOURCES = [NATIVE / n for n in ("vmdk.c", "vmdk_descriptor.c", "vmdk_sparse.c", "vmdk_writer.c")]
TOOL_SRC = Path(__file__).with_name("vmdk_tool.c")
FUZZ_SRC = ROOT / "tests" / "fuzz" / "fuzz_vmdk.c"
REGRESSIONS = ROOT / "tests" / "fuzz" / "regressions" / "vmdk"

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-pthread"]
SAN_CFLAGS = [
    "-O1", "-g", "-Wall", "-Wextra", "-std=gnu11", "-pthread",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
]
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87",
}
SAN_MARKERS = ("Sanitizer", "runtime error:", "LeakSanitizer")

SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]
MiB = 1024 * 1024
GRAIN = 64 * 1024
TIMEOUT = 120


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{tool} is required under CI (Debian packages gcc, zlib1g-dev, qemu-utils)")
        pytest.skip(f"{tool} not installed")
    return path


def _run(args, *, env=None, check=True, timeout=TIMEOUT):
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                       env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _assert_no_sanitizer(p, what):
    for m in SAN_MARKERS:
        assert m not in p.stderr, f"sanitizer report for {what}:\n{p.stderr}"
    assert p.returncode not in (86, 87) and p.returncode >= 0, \
        f"{what}: exit status {p.returncode}\n{p.stderr}"


def _build(out: Path, sources, flags, extra=()):
    _require("gcc")
    cmd = ["gcc", *flags, f"-I{NATIVE}", *extra, *map(str, sources), "-lz", "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"build failed: {' '.join(cmd)}\n{p.stderr}"
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vmdk_build")


@pytest.fixture(scope="session")
def tool(build_dir):
    return _build(build_dir / "vmdk_tool", [*SOURCES, TOOL_SRC], CFLAGS)


@pytest.fixture(scope="session")
def san_tool(build_dir):
    return _build(build_dir / "vmdk_tool_san", [*SOURCES, TOOL_SRC], SAN_CFLAGS)


@pytest.fixture(scope="session")
def qemu_img():
    _require("qemu-io")
    return _require("qemu-img")


def _write_at(f, off, data):
    f.seek(off)
    f.write(data)


def make_source_raw(path: Path, size: int) -> Path:
    """A sparse raw image with data at awkward places: unaligned starts, grain and
    grain-table boundaries, a lone byte, compressible text, incompressible noise,
    explicit zeros and the last partial grain (size is not a multiple of 512)."""
    rnd = random.Random(20240601)
    with open(path, "wb") as f:
        f.truncate(size)
        _write_at(f, 0, b"boot" * 25)
        _write_at(f, 3 * GRAIN + 17, rnd.randbytes(70000))
        _write_at(f, MiB - 10, b"\xff" * 20)
        _write_at(f, 5 * MiB + 3 * 4096 + 1, b"\x01")
        _write_at(f, 10 * MiB, bytes(128 * 1024))
        _write_at(f, 20 * MiB + 333, b"the quick brown fox jumps over the lazy dog\n" * 4700)
        _write_at(f, 32 * MiB - 5000, rnd.randbytes(10000))
        _write_at(f, size - 10, b"0123456789")
    return path


def _sector_padded(raw: Path, out: Path) -> Path:
    shutil.copyfile(raw, out)
    size = raw.stat().st_size
    with open(out, "r+b") as f:
        f.truncate((size + 511) // 512 * 512)
    return out


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("vmdk_src")
    return make_source_raw(d / "source.raw", 40 * MiB + 12345)


@pytest.fixture(scope="session")
def images(tmp_path_factory, source, qemu_img):
    """subformat -> (image path, qemu's raw conversion of it)."""
    out = {}
    for sub in SUBFORMATS:
        d = tmp_path_factory.mktemp(sub)
        img = d / "disk.vmdk"
        _run([qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}",
              source, img])
        ref = d / "qemu.raw"
        _run([qemu_img, "convert", "-O", "raw", img, ref])
        out[sub] = (img, ref)
    return out


def _same_files(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(16 * MiB)
            y = fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


def _info(tool_path, img, env=None):
    p = _run([tool_path, "info", img], env=env)
    return json.loads(p.stdout)


def _check_extents_cover(info, ref: Path, max_fraction: float):
    np = pytest.importorskip("numpy")
    data = np.fromfile(ref, dtype=np.uint8)
    assert info["capacity"] == data.size
    mask = np.zeros(data.size, dtype=bool)
    prev_end = -1
    for start, length in info["extents"]:
        assert length > 0 and start > prev_end, f"extents not sorted and merged: {info['extents']}"
        assert start + length <= data.size
        mask[start:start + length] = True
        prev_end = start + length
    uncovered = np.flatnonzero(data.astype(bool) & ~mask)
    assert uncovered.size == 0, f"non-zero bytes outside the extents, first at {uncovered[0]}"
    allocated = int(mask.sum())
    assert allocated <= max_fraction * data.size, \
        f"extents cover {allocated} of {data.size} bytes: unallocated space not skipped"


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_dump_matches_qemu(subformat, images, tool, tmp_path):
    img, ref = images[subformat]
    info = _info(tool, img)
    assert info["create_type"] == subformat
    assert info["capacity"] == ref.stat().st_size
    for i, opts in enumerate([[], ["--chunk", "12345"], ["--chunk", "65536", "--threads", "4"],
                              ["--chunk", "4194304", "--threads", "3"]]):
        out = tmp_path / f"dump{i}.raw"
        _run([tool, "dump", img, out, *opts])
        assert _same_files(out, ref), f"{subformat} dump with {opts} differs from qemu-img"


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_extents_cover_data_and_skip_holes(subformat, images, tool):
    img, ref = images[subformat]
    _check_extents_cover(_info(tool, img), ref, max_fraction=0.15)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_sanitizer_build_reads_good_images(subformat, images, san_tool, tmp_path):
    img, ref = images[subformat]
    p = _run([san_tool, "info", img], env=SAN_ENV)
    _assert_no_sanitizer(p, img)
    out = tmp_path / "dump.raw"
    p = _run([san_tool, "dump", img, out, "--chunk", "100000", "--threads", "4"], env=SAN_ENV)
    _assert_no_sanitizer(p, img)
    assert _same_files(out, ref)


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_two_gb_extents_across_the_boundary(subformat, tool, qemu_img, tmp_path):
    """A disk just over 2 GiB: two extent files, data straddling the split."""
    raw = tmp_path / "big.raw"
    size = 2 * 1024 * MiB + 3 * MiB + 1536
    rnd = random.Random(7)
    with open(raw, "wb") as f:
        f.truncate(size)
        _write_at(f, 0, b"x" * 513)
        _write_at(f, 1024 * MiB + 12345, rnd.randbytes(200000))
        _write_at(f, 2 * 1024 * MiB - 100, rnd.randbytes(300))
        _write_at(f, size - 700, b"q" * 700)
    img = tmp_path / "big.vmdk"
    _run([qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", raw, img])
    assert sum(1 for line in img.read_text().splitlines() if line.startswith("RW ")) == 2
    info = _info(tool, img)
    assert info["capacity"] == size
    out = tmp_path / "dump.raw"
    _run([tool, "dump", img, out, "--chunk", str(8 * MiB), "--threads", "2"])
    assert _same_files(out, raw)
    total = sum(length for _, length in info["extents"])
    assert total < 16 * MiB
    for off, n in [(0, 513), (1024 * MiB + 12345, 200000), (2 * 1024 * MiB - 100, 300),
                   (size - 700, 700)]:
        assert any(s <= off and off + n <= s + length for s, length in info["extents"]), (off, info)


def _mixed_extent_files(tmp_path, qemu_img):
    rnd = random.Random(3)
    flat = rnd.randbytes(MiB)
    (tmp_path / "flat.bin").write_bytes(flat)
    sp_raw = tmp_path / "sp.raw"
    with open(sp_raw, "wb") as f:
        f.truncate(512 * 1024)
        _write_at(f, 70000, b"sparse!" * 1000)
    _run([qemu_img, "convert", "-f", "raw", "-O", "vmdk", sp_raw, tmp_path / "sp.vmdk"])
    return flat, sp_raw.read_bytes()


def _descriptor(extent_lines: str) -> str:
    return ("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            'createType="twoGbMaxExtentSparse"\n\n# Extent description\n'
            + extent_lines
            + '\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n')


def test_hand_written_descriptor_with_offsets_matches_qemu(tool, san_tool, qemu_img, tmp_path):
    """FLAT extents at sector offsets into a shared file, VMFS, and a SPARSE extent."""
    flat, sp = _mixed_extent_files(tmp_path, qemu_img)
    img = tmp_path / "mixed.vmdk"
    img.write_text(_descriptor('RW 256 FLAT "flat.bin" 1024\n'
                               'RW 1024 SPARSE "sp.vmdk"\n'
                               'RW 37 VMFS "flat.bin"\n'
                               'RW 8 FLAT "flat.bin" 2040\n'))
    expected = (flat[512 * 1024:512 * 1024 + 256 * 512] + sp + flat[:37 * 512]
                + flat[2040 * 512:2048 * 512])
    ref = tmp_path / "qemu.raw"
    _run([qemu_img, "convert", "-O", "raw", img, ref])
    assert ref.read_bytes() == expected
    for t, env in ((tool, None), (san_tool, SAN_ENV)):
        out = tmp_path / "dump.raw"
        p = _run([t, "dump", img, out, "--chunk", "7777", "--threads", "2"], env=env)
        _assert_no_sanitizer(p, img)
        assert out.read_bytes() == expected
    info = _info(tool, img)
    assert info["capacity"] == len(expected)
    _check_extents_cover(info, ref, max_fraction=1.0)


def test_zero_and_rdonly_extents(tool, san_tool, qemu_img, tmp_path):
    """ZERO and RDONLY extents, per the descriptor format.  (qemu-img 7.2 is no
    oracle here: its parser skips extent lines without a file name.)"""
    flat, sp = _mixed_extent_files(tmp_path, qemu_img)
    img = tmp_path / "zero.vmdk"
    img.write_text(_descriptor('RDONLY 256 FLAT "flat.bin" 1024\n'
                               "RW 100 ZERO\n"
                               'RDONLY 1024 SPARSE "sp.vmdk"\n'
                               "RDONLY 3 ZERO\n"
                               'RW 8 FLAT "flat.bin" 2040\n'))
    expected = (flat[512 * 1024:512 * 1024 + 256 * 512] + bytes(100 * 512) + sp
                + bytes(3 * 512) + flat[2040 * 512:2048 * 512])
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    for t, env in ((tool, None), (san_tool, SAN_ENV)):
        out = tmp_path / "dump.raw"
        p = _run([t, "dump", img, out, "--chunk", "5000", "--threads", "3"], env=env)
        _assert_no_sanitizer(p, img)
        assert out.read_bytes() == expected
    info = _info(tool, img)
    assert info["capacity"] == len(expected)
    _check_extents_cover(info, ref, max_fraction=1.0)
    zero = (256 * 512, 356 * 512)
    assert not any(s < zero[1] and s + n > zero[0] for s, n in info["extents"]), info


def test_extent_file_names_are_relative_to_the_descriptor(tool, images, tmp_path):
    img, ref = images["monolithicFlat"]
    cwd_elsewhere = tmp_path / "elsewhere"
    cwd_elsewhere.mkdir()
    p = subprocess.run([str(tool), "info", str(img)], cwd=cwd_elsewhere, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr


def test_zeroed_grain_entries_read_as_zeros(tool, qemu_img, tmp_path):
    img = tmp_path / "z.vmdk"
    _run([qemu_img, "create", "-f", "vmdk", "-o", "zeroed_grain=on", img, "10M"])
    _run(["qemu-io", "-c", "write -P 0x11 0 192k", "-c", "write -z 64k 64k",
          "-c", "write -P 0x22 1M 64k", "-c", "write -z 1M 64k", img])
    raw = img.read_bytes()
    gd_off = struct.unpack_from("<Q", raw, 56)[0]
    gt_off = struct.unpack_from("<I", raw, gd_off * 512)[0]
    gt = struct.unpack_from("<20I", raw, gt_off * 512)
    assert gt[1] == 1 and gt[16] == 1, f"qemu-io did not write zeroed-grain entries: {gt}"
    ref = tmp_path / "qemu.raw"
    _run([qemu_img, "convert", "-O", "raw", img, ref])
    out = tmp_path / "dump.raw"
    _run([tool, "dump", img, out, "--chunk", "4096"])
    assert _same_files(out, ref)
    info = _info(tool, img)
    assert info["extents"] == [[0, 65536], [131072, 65536]]


def make_footer_stream(data: bytes, grain_sectors: int = 128, gtes: int = 512,
                       bomb_grain: int | None = None) -> bytes:
    """A streamOptimized file as VMware writes it: header with gdOffset "at end",
    compressed grains behind grain markers, GT/GD metadata markers, then footer
    marker, footer and end-of-stream marker.  The last grain is stored short."""
    grain = grain_sectors * 512
    cap_sectors = (len(data) + 511) // 512
    ngrains = (cap_sectors + grain_sectors - 1) // grain_sectors
    ngts = (ngrains + gtes - 1) // gtes
    desc = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
            f'createType="streamOptimized"\n\nRW {cap_sectors} SPARSE "s.vmdk"\n').encode()
    desc_sectors = 1
    while desc_sectors * 512 < len(desc):
        desc_sectors += 1

    def header(gd_offset):
        h = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 3, 0x30001, cap_sectors, grain_sectors,
                        1, desc_sectors, gtes, 0, gd_offset, 1 + desc_sectors, 0,
                        b"\n \r\n", 1)
        return h.ljust(512, b"\0")

    def pad(b):
        return b + bytes(-len(b) % 512)

    out = bytearray(header(0xFFFFFFFFFFFFFFFF))
    out += pad(desc)
    tables = [[0] * gtes for _ in range(ngts)]
    for g in range(ngrains):
        chunk = data[g * grain:(g + 1) * grain]
        if g == bomb_grain:
            chunk = bytes(3 * grain)
        elif not any(chunk):
            continue
        comp = zlib.compress(chunk, 6)
        tables[g // gtes][g % gtes] = len(out) // 512
        out += pad(struct.pack("<QI", g * grain_sectors, len(comp)) + comp)
    gt_sectors = (gtes * 4 + 511) // 512
    gd = []
    for t in tables:
        if not any(t):
            gd.append(0)
            continue
        out += struct.pack("<QII", gt_sectors, 0, 1).ljust(512, b"\0")
        gd.append(len(out) // 512)
        out += pad(struct.pack(f"<{gtes}I", *t))
    gd_sectors = (len(gd) * 4 + 511) // 512
    out += struct.pack("<QII", gd_sectors, 0, 2).ljust(512, b"\0")
    gd_offset = len(out) // 512
    out += pad(struct.pack(f"<{len(gd)}I", *gd))
    out += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    out += header(gd_offset)
    out += bytes(512)  # end-of-stream marker
    return bytes(out)


def test_vmware_style_stream_with_footer(tool, san_tool, qemu_img, source, tmp_path):
    data = source.read_bytes()
    data += bytes(-len(data) % 512)
    img = tmp_path / "s.vmdk"
    img.write_bytes(make_footer_stream(data))
    ref = tmp_path / "qemu.raw"
    _run([qemu_img, "convert", "-O", "raw", img, ref])
    assert _same_files(ref, _sector_padded(source, tmp_path / "padded.raw"))
    for t, env in ((tool, None), (san_tool, SAN_ENV)):
        out = tmp_path / "dump.raw"
        p = _run([t, "dump", img, out, "--chunk", "50000", "--threads", "2"], env=env)
        _assert_no_sanitizer(p, img)
        assert _same_files(out, ref)
    info = _info(tool, img)
    assert info["create_type"] == "streamOptimized"
    _check_extents_cover(info, ref, max_fraction=0.15)


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("grain,chunk", [(0, MiB), (0, 100000), (4096, 65536), (1 << 20, 3 * MiB)])
def test_writer_output_passes_qemu_check_and_round_trips(grain, chunk, tool, qemu_img, source,
                                                         tmp_path):
    img = tmp_path / "w.vmdk"
    _run([tool, "create", source, img, "--grain", str(grain), "--chunk", str(chunk)])
    check = _run([qemu_img, "check", img], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    qinfo = json.loads(_run([qemu_img, "info", "--output=json", img]).stdout)
    assert qinfo["format"] == "vmdk"
    assert qinfo["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert qinfo["virtual-size"] == (source.stat().st_size + 511) // 512 * 512
    back = tmp_path / "back.raw"
    _run([qemu_img, "convert", "-O", "raw", img, back])
    padded = _sector_padded(source, tmp_path / "padded.raw")
    assert _same_files(back, padded)
    out = tmp_path / "ours.raw"
    _run([tool, "dump", img, out])
    assert _same_files(out, padded)
    # Unwritten zero grains stay unallocated: the file is far smaller than the disk.
    assert img.stat().st_size < source.stat().st_size // 4


def test_writer_layout_is_vmware_like(tool, source, tmp_path):
    img = tmp_path / "w.vmdk"
    _run([tool, "create", source, img])
    raw = img.read_bytes()
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd,
     overhead) = struct.unpack_from("<4sIIQQQQIQQQ", raw)
    assert magic == b"KDMV" and version == 1 and flags & 0x3 == 0x3
    assert grain == 128 and gtes == 512 and desc_off == 1 and desc_size == 20
    assert raw[73:77] == b"\n \r\n"
    assert b'createType="monolithicSparse"' in raw[512:512 * 21]
    assert overhead % grain == 0
    n_gd = -(-capacity // (gtes * grain))
    gd_primary = struct.unpack_from(f"<{n_gd}I", raw, gd * 512)
    gd_redundant = struct.unpack_from(f"<{n_gd}I", raw, rgd * 512)
    for a, b in zip(gd_primary, gd_redundant):
        assert a != b and a and b
        assert raw[a * 512:a * 512 + gtes * 4] == raw[b * 512:b * 512 + gtes * 4]
    assert any(raw[a * 512:a * 512 + gtes * 4].strip(b"\0") for a in gd_primary)


def test_sanitizer_build_writes_and_reads_back(san_tool, qemu_img, source, tmp_path):
    img = tmp_path / "w.vmdk"
    p = _run([san_tool, "create", source, img, "--chunk", "100000"], env=SAN_ENV)
    _assert_no_sanitizer(p, img)
    assert _run([qemu_img, "check", img], check=False).returncode == 0
    out = tmp_path / "back.raw"
    p = _run([san_tool, "dump", img, out, "--threads", "4", "--chunk", "65536"], env=SAN_ENV)
    _assert_no_sanitizer(p, img)
    assert _same_files(out, _sector_padded(source, tmp_path / "padded.raw"))


def test_writer_refuses_impossible_capacity(tool, tmp_path):
    raw = tmp_path / "huge.raw"
    with open(raw, "wb") as f:
        f.truncate(3 * 1024 * 1024 * MiB)  # 3 TiB: beyond 32-bit sector offsets
    p = _run([tool, "create", raw, tmp_path / "h.vmdk"], check=False)
    assert p.returncode == 2 and "too large" in p.stderr, p.stderr


# ---------------------------------------------------------------- hostile input


@pytest.fixture(scope="session")
def corrupt_bases(tmp_path_factory, qemu_img):
    """Small images to corrupt: sparse and stream, two grain tables each."""
    d = tmp_path_factory.mktemp("vmdk_corrupt_base")
    raw = d / "base.raw"
    rnd = random.Random(11)
    with open(raw, "wb") as f:
        f.truncate(34 * MiB)
        _write_at(f, 0, rnd.randbytes(100000))
        _write_at(f, 33 * MiB, b"end of disk" * 100)
    out = {"raw": raw.read_bytes()}
    for sub in ("monolithicSparse", "streamOptimized"):
        img = d / f"{sub}.vmdk"
        _run([qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", raw, img])
        out[sub] = img.read_bytes()
    out["footer"] = make_footer_stream(out["raw"])
    return out


def _hdr(b: bytes):
    (magic, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd,
     overhead) = struct.unpack_from("<4sIIQQQQIQQQ", b)
    return dict(capacity=capacity, grain=grain, gtes=gtes, gd=gd, desc_off=desc_off)


def _put(b: bytes, off: int, fmt: str, *vals) -> bytes:
    m = bytearray(b)
    struct.pack_into(fmt, m, off, *vals)
    return bytes(m)


def _first_gt_entry_offset(b: bytes) -> int:
    h = _hdr(b)
    gt = struct.unpack_from("<I", b, h["gd"] * 512)[0]
    return gt * 512


def _first_marker(b: bytes) -> int:
    """Byte offset of the grain marker of grain 0 in a stream file."""
    return struct.unpack_from("<I", b, _first_gt_entry_offset(b))[0] * 512


def _footer_gd(b: bytes) -> int:
    return struct.unpack_from("<Q", b, len(b) - 1024 + 56)[0]


def _sparse_cases(b):
    h = _hdr(b)
    gt0 = _first_gt_entry_offset(b)
    gd = h["gd"] * 512
    sectors = len(b) // 512
    return {
        "empty": (b"", r"no createType"),
        "truncated-header": (b[:100], r"no createType|too short"),
        "truncated-half": (b[:len(b) // 2], r"beyond the end of the file|past the end"),
        "truncated-to-gd": (b[:gd + 2], r"grain directory .* runs past the end"),
        "bad-magic": (b"KDMW" + b[4:], r"not a VMDK"),
        "version": (_put(b, 4, "<I", 77), r"unsupported version 77"),
        "huge-grain": (_put(b, 20, "<Q", 1 << 40), r"grain size of 1099511627776 sectors"),
        "grain-not-power-of-two": (_put(b, 20, "<Q", 100), r"grain size of 100 sectors"),
        "grain-zero": (_put(b, 20, "<Q", 0), r"grain size of 0 sectors"),
        "gtes-zero": (_put(b, 44, "<I", 0), r"0 entries per grain table"),
        "gtes-huge": (_put(b, 44, "<I", 0x80000000), r"entries per grain table"),
        "capacity-absurd": (_put(b, 12, "<Q", 1 << 62), r"capacity of \d+ sectors is beyond"),
        "capacity-large": (_put(b, 12, "<Q", 1 << 40), r"grain directory of \d+ entries"),
        "gd-past-eof": (_put(b, 56, "<Q", 10 ** 12), r"runs past the end of the file"),
        "gd-zero": (_put(b, 56, "<Q", 0), r"no grain directory"),
        "gd-entry-past-eof": (_put(b, gd, "<I", 0xFFFFFFF0),
                              r"grain directory entry 0 points at sector 4294967280 beyond"),
        "gd-entry-almost-eof": (_put(b, gd, "<I", sectors - 1),
                                r"grain directory entry 0 points at sector"),
        "gt-overlap": (_put(b, gd + 4, "<I", struct.unpack_from("<I", b, gd)[0] + 1),
                       r"overlapping grain tables"),
        "gt-entry-past-eof": (_put(b, gt0, "<I", 0x7FFFFFFF),
                              r"grain table entry 0 of table 0 points at sector 2147483647 "
                              r"beyond the end of the file \(\d+ sectors\)"),
        "gt-entry-last-sector": (_put(b, gt0 + 4, "<I", sectors - 1),
                                 r"grain table entry 1 of table 0: grain at sector \d+ runs past"
                                 r"|metadata marker|does not inflate|past the end"),
        "newline-damaged": (_put(b, 75, "<B", ord("\n")), r"newline check bytes"),
        "compress-unknown": (_put(b, 77, "<H", 9), r"unknown compression algorithm 9"),
        "desc-huge": (_put(b, 36, "<Q", 1 << 40), r"embedded descriptor"),
        "desc-past-eof": (_put(b, 28, "<Q", 1 << 50), r"embedded descriptor"),
        "parent": (b.replace(b"parentCID=ffffffff", b"parentCID=1234abcd"), r"parent"),
        "desc-long-line": (b[:512 + 100] + b"#" * 9000 + b[512 + 9100:],
                           r"longer than 8192 bytes"),
        # An empty disk is not a disk to back up; a header that disagrees with its own
        # descriptor is damaged (69632 sectors: the 34 MiB base).
        "capacity-zero": (_put(b, 12, "<Q", 0), r"sparse header gives a capacity of 0 sectors \(an empty "
                          r"disk\), but its embedded descriptor's extents add up to 69632 sectors"),
        "capacity-zero-no-desc": (_put(_put(b, 12, "<Q", 0), 28, "<Q", 0),
                                  r"sparse header gives a capacity of 0 sectors: an empty disk"),
        "capacity-smaller": (_put(b, 12, "<Q", 65536), r"its embedded descriptor's extents add up to 69632 "
                             r"sectors, but the sparse header gives a capacity of 65536 sectors"),
        "capacity-larger": (_put(b, 12, "<Q", 69633), r"add up to 69632 sectors, but the sparse header "
                            r"gives a capacity of 69633 sectors"),
    }


def _stream_cases(b, footer):
    m = _first_marker(b)
    fm = _first_marker_footer(footer)
    lm = _marker_footer(footer, 33 * MiB // GRAIN)  # the last grain: near the end of the file
    fgd = _footer_gd(footer) * 512
    first_gt = struct.unpack_from("<I", footer, fgd)[0] * 512
    return {
        "marker-size-huge": (_put(b, m + 8, "<I", 0xFFFFFFFF), r"claims 4294967295 compressed bytes"),
        "marker-size-short": (_put(b, m + 8, "<I", 10), r"grain at sector 128 \(table 0 entry 0\) does not inflate"),
        "footer-marker-past-eof": (_put(footer, lm + 8, "<I", len(footer) - lm),
                                   r"compressed bytes run past the end of the file"),
        "marker-lba": (_put(b, m, "<Q", 999 * 128), r"is for sector 127872"),
        "deflate-garbage": (b[:m + 12] + b"\xff" * 64 + b[m + 76:], r"does not inflate"),
        "gt-at-metadata": (_put(b, _first_gt_entry_offset(b), "<I", len(b) // 512 - 1),
                           r"metadata marker"),
        "footer-missing": (footer[:-512], r"no end-of-stream marker|no footer marker"),
        "footer-cut": (footer[:-1024], r"no footer marker|no KDMV magic|end-of-stream"),
        "footer-bad-magic": (_put(footer, len(footer) - 1024, "<I", 0), r"footer .* no KDMV magic"),
        "footer-gd-at-end": (_put(footer, len(footer) - 1024 + 56, "<Q", 0xFFFFFFFFFFFFFFFF),
                             r"also says"),
        "footer-grain-bomb-size": (_put(footer, fm + 8, "<I", 0x7FFFFFFF), r"claims"),
        "footer-gd-past-eof": (_put(footer, len(footer) - 1024 + 56, "<Q", 1 << 40),
                               r"runs past the end"),
        "footer-gt-past-eof": (_put(footer, first_gt, "<I", 0x10000000),
                               r"points at sector 268435456 beyond the end"),
        "only-header": (b[:512], r"runs past the end|too short"),
    }


def _marker_footer(footer: bytes, grain: int) -> int:
    fgd = _footer_gd(footer) * 512
    gt = struct.unpack_from("<I", footer, fgd + 4 * (grain // 512))[0] * 512
    return struct.unpack_from("<I", footer, gt + 4 * (grain % 512))[0] * 512


def _first_marker_footer(footer: bytes) -> int:
    return _marker_footer(footer, 0)


def _corrupt_cases(bases):
    cases = {}
    for name, (data, pat) in _sparse_cases(bases["monolithicSparse"]).items():
        cases[f"sparse-{name}"] = (data, pat)
    for name, (data, pat) in _sparse_cases(bases["streamOptimized"]).items():
        if name in ("desc-long-line",):
            continue
        cases[f"stream-{name}"] = (data, pat)
    for name, (data, pat) in _stream_cases(bases["streamOptimized"], bases["footer"]).items():
        cases[f"stream-{name}"] = (data, pat)
    bomb = bases["raw"][:2 * MiB]
    cases["stream-inflates-past-a-grain"] = (make_footer_stream(bomb, bomb_grain=5),
                                             r"larger than a grain")
    return cases


CORRUPT_NAMES = (
    [f"sparse-{n}" for n in (
        "empty truncated-header truncated-half truncated-to-gd bad-magic version huge-grain "
        "grain-not-power-of-two grain-zero gtes-zero gtes-huge capacity-absurd capacity-large "
        "gd-past-eof gd-zero gd-entry-past-eof gd-entry-almost-eof gt-overlap gt-entry-past-eof "
        "gt-entry-last-sector newline-damaged compress-unknown desc-huge desc-past-eof parent "
        "desc-long-line capacity-zero capacity-zero-no-desc capacity-smaller capacity-larger").split()]
    + [f"stream-{n}" for n in (
        "empty truncated-header truncated-half truncated-to-gd bad-magic version huge-grain "
        "grain-not-power-of-two grain-zero gtes-zero gtes-huge capacity-absurd capacity-large "
        "gd-past-eof gd-zero gd-entry-past-eof gd-entry-almost-eof gt-overlap gt-entry-past-eof "
        "gt-entry-last-sector newline-damaged compress-unknown desc-huge desc-past-eof parent "
        "marker-size-huge marker-size-short footer-marker-past-eof marker-lba deflate-garbage gt-at-metadata "
        "footer-missing footer-cut footer-bad-magic footer-gd-at-end footer-grain-bomb-size "
        "footer-gd-past-eof footer-gt-past-eof only-header inflates-past-a-grain "
        "capacity-zero capacity-zero-no-desc capacity-smaller capacity-larger").split()]
)


def _expect_error(san_tool, img: Path, pattern: str, name_in_message: str):
    """info, then dump if info passed: one of them must fail with status 2 and a
    message naming the file; neither may trip a sanitizer or hang."""
    p = _run([san_tool, "info", img], env=SAN_ENV, check=False)
    _assert_no_sanitizer(p, img)
    if p.returncode == 0:
        p = _run([san_tool, "dump", img, img.with_suffix(".out"), "--chunk", "65536"],
                 env=SAN_ENV, check=False)
        _assert_no_sanitizer(p, img)
    assert p.returncode == 2, f"{img.name}: expected an error, got {p.returncode}\n{p.stderr}"
    msg = p.stderr.strip()
    assert msg and "\n" not in msg, f"{img.name}: expected one line, got {p.stderr!r}"
    assert name_in_message in msg, f"{img.name}: message does not name the file: {msg}"
    assert re.search(pattern, msg), f"{img.name}: {msg!r} does not match {pattern!r}"


@pytest.mark.parametrize("case", CORRUPT_NAMES)
def test_corrupt_sparse_and_stream_files(case, corrupt_bases, san_tool, tmp_path):
    data, pattern = _corrupt_cases(corrupt_bases)[case]
    img = tmp_path / f"{case}.vmdk"
    img.write_bytes(data)
    _expect_error(san_tool, img, pattern, img.name)


DESC_HEAD = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
             'createType="monolithicFlat"\n\n')

DESCRIPTOR_CASES = {
    "absurd-sectors": ('RW 99999999999999999999999 FLAT "f.bin" 0\n', "not a sector count"),
    "too-many-sectors": ('RW 4611686018427387904 FLAT "f.bin" 0\n', r"extent of \d+ sectors"),
    "zero-sectors": ('RW 0 FLAT "f.bin" 0\n', r"extent of 0 sectors"),
    "sum-overflow": ("RW 2199023255552 ZERO\nRW 1 ZERO\n", r"add up to more than"),
    "many-extents": ("RW 1 ZERO\n" * 5000, r"more than 4096 extents"),
    "long-line": ("#" + "x" * 10000 + "\nRW 1 ZERO\n", r"line 7 is longer than 8192"),
    "missing-file": ('RW 8 FLAT "nope.bin" 0\n', r"nope.bin: cannot open"),
    "no-quote": ('RW 8 FLAT "f.bin 0\n', r"no closing quote"),
    "no-name": ("RW 8 FLAT\n", r"file name missing"),
    "empty-name": ('RW 8 FLAT "" 0\n', r"file name of 0 bytes"),
    "bad-offset": ('RW 8 FLAT "f.bin" -5\n', r"offset is not a sector count"),
    "huge-offset": ('RW 8 FLAT "f.bin" 18446744073709551615\n', r"offset is not a sector count"),
    "trailing-junk": ('RW 8 FLAT "f.bin" 0 junk\n', r"unexpected text"),
    "flat-too-small": ('RW 100 FLAT "f.bin" 0\n', r"f.bin: flat extent 1 needs 51200 bytes"),
    "flat-offset-past-eof": ('RW 1 FLAT "f.bin" 1000000\n', r"f.bin: flat extent 1 needs 512 bytes at byte 512000000"),
    "unknown-type": ('RW 8 WEIRD "f.bin"\n', r"unknown extent type 'WEIRD'"),
    "vmfssparse": ('RW 8 VMFSSPARSE "f.bin"\n', r"VMFSSPARSE extents are not supported"),
    "noaccess": ('NOACCESS 8 FLAT "f.bin" 0\n', r"NOACCESS"),
    "sparse-with-offset": ('RW 8 SPARSE "f.bin" 3\n', r"SPARSE extent with an offset"),
    "no-extents": ("ddb.adapterType = \"ide\"\n", r"lists no extents"),
    "directory-extent": ('RW 8 FLAT "sub" 0\n', r"sub: is a directory"),
    "fifo-extent": ('RW 8 FLAT "pipe" 0\n', r"pipe: is not a regular file"),
    "self-sparse": ('RW 8 SPARSE "{self}"\n', r"bad magic|too short"),
    "sparse-not-kdmv": ('RW 8 SPARSE "f.bin"\n', r"f.bin: bad magic"),
    "sparse-extent-corrupt": ('RW 8 SPARSE "bad.vmdk"\n', r"bad.vmdk: header: grain size of 3 sectors"),
    "cowd": ('RW 8 SPARSE "delta-cowd.bin"\n', r"delta-cowd.bin: COWD"),
    "sparse-twice": ('RW 1024 SPARSE "good.vmdk"\nRW 1024 SPARSE "good.vmdk"\n',
                     r"good.vmdk: sparse extent 2 uses the same file as an earlier extent"),
    "create-type-long": ('RW 1 ZERO\ncreateType="' + "m" * 100 + '"\n', r"createType of 100"),
    # Extents must stay in the descriptor's directory (symbolic links resolved).
    "absolute-extent": ('RW 1 FLAT "/etc/passwd" 0\n',
                        r'extent 1 is "/etc/passwd" \(/etc/passwd\), outside the descriptor\'s directory /\S+; '
                        r"such an extent is not read unless external extents are allowed"),
    "dotdot-extent": ('RW 8 ZERO\nRW 8 FLAT "../outside.bin" 0\n',
                      r'extent 2 is "\S+/\.\./outside\.bin" \(/\S+/outside\.bin\), outside the descriptor'),
    "symlink-extent": ('RW 8 FLAT "link.bin" 0\n', r'extent 1 is "\S+/link\.bin" \(/\S+/outside\.bin\), outside'),
    "dotdot-back-inside": ('RW 8 FLAT "../{dir}/f.bin" 0\nRW 1 FLAT "nope.bin"\n', r"nope.bin: cannot open"),
    "sparse-smaller": ('RW 1000 SPARSE "good.vmdk"\n', r"good.vmdk: sparse extent 1 is given 1000 sectors, "
                       r"but the sparse header gives a capacity of 69632 sectors"),
    "sparse-larger": ('RW 8 ZERO\nRW 69633 SPARSE "good.vmdk"\n',
                      r"good.vmdk: sparse extent 2 is given 69633 sectors, but the sparse header gives a "
                      r"capacity of 69632 sectors"),
}


@pytest.mark.parametrize("case", sorted(DESCRIPTOR_CASES))
def test_corrupt_descriptors(case, san_tool, corrupt_bases, tmp_path):
    body, pattern = DESCRIPTOR_CASES[case]
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "pipe")
    bad = bytearray(corrupt_bases["monolithicSparse"])
    struct.pack_into("<Q", bad, 20, 3)
    (tmp_path / "bad.vmdk").write_bytes(bytes(bad))
    (tmp_path / "good.vmdk").write_bytes(corrupt_bases["monolithicSparse"])
    (tmp_path / "delta-cowd.bin").write_bytes(b"COWD" + bytes(2044))
    (tmp_path.parent / "outside.bin").write_bytes(bytes(4096))
    (tmp_path / "link.bin").symlink_to(tmp_path.parent / "outside.bin")
    img = tmp_path / f"{case}.vmdk"
    img.write_text(DESC_HEAD + body.replace("{self}", img.name).replace("{dir}", tmp_path.name))
    named = re.match(r"(\S+): ", pattern)
    _expect_error(san_tool, img, pattern, named.group(1) if named else img.name)


def test_not_a_vmdk_at_all(san_tool, tmp_path):
    big = tmp_path / "garbage.vmdk"
    big.write_bytes(random.Random(5).randbytes(2 * MiB))
    _expect_error(san_tool, big, r"too large for a text descriptor", big.name)
    small = tmp_path / "small.vmdk"
    small.write_bytes(random.Random(6).randbytes(1000).replace(b"\0", b"a"))
    _expect_error(san_tool, small, r"no createType", small.name)
    _expect_error(san_tool, tmp_path, r"is a directory", tmp_path.name)


def test_delta_disk_with_parent_is_refused(san_tool, tmp_path):
    (tmp_path / "f.bin").write_bytes(bytes(4096))
    img = tmp_path / "delta.vmdk"
    img.write_text(DESC_HEAD.replace("parentCID=ffffffff", "parentCID=0badf00d")
                   + 'parentFileNameHint="base.vmdk"\nRW 8 FLAT "f.bin" 0\n')
    _expect_error(san_tool, img, r"parent", img.name)


# ---------------------------------------------------------------- fuzz regressions


@pytest.fixture(scope="session")
def replay(build_dir):
    return _build(build_dir / "fuzz_vmdk_replay", [*SOURCES, FUZZ_SRC], SAN_CFLAGS,
                  extra=["-DVMDK_FUZZ_REPLAY"])


def test_fuzz_regressions_replay_clean(replay):
    cases = sorted(p for p in REGRESSIONS.glob("*") if p.is_file() and p.name != "README.md")
    p = _run([replay, *cases], env=SAN_ENV, check=False, timeout=600)
    _assert_no_sanitizer(p, "fuzz regressions")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("replayed ") == len(cases)
