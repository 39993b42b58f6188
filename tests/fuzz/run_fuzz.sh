#!/usr/bin/env bash
# Fuzz the VMDK reader (native/vmdk*.c) with libFuzzer, AddressSanitizer and UBSan.
#
#   tests/fuzz/run_fuzz.sh [SECONDS]        (default 60)
#
# Builds tests/fuzz/fuzz_vmdk.c with clang, generates a seed corpus from qemu-img
# images (every hosted subformat, a hand-written mixed descriptor, a VMware-style
# stream with a footer), fuzzes for SECONDS with one worker, and copies every
# crashing, leaking, timing-out or out-of-memory input into
# tests/fuzz/regressions/vmdk/, which tests/native/test_vmdk.py replays.
# Exit status: 0 when nothing was found, 1 when something was (or on a setup error).
#
# Needs clang (Debian: apt-get install clang; libFuzzer ships with it), zlib1g-dev,
# qemu-utils and python3.  Work files go to $FUZZ_WORK (default .cache/fuzz_vmdk,
# which git ignores); the corpus there grows across runs.
set -euo pipefail

secs="${1:-60}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 1 ;; esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${FUZZ_WORK:-$root/.cache/fuzz_vmdk}"
regress="$here/regressions/vmdk"
mkdir -p "$work/corpus" "$work/seeds" "$work/artifacts" "$regress"

for t in clang qemu-img python3; do
    command -v "$t" >/dev/null || { echo "$0: $t is required" >&2; exit 1; }
done

bin="$work/fuzz_vmdk"
clang -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer -I"$root/native" \
    "$root/native/vmdk.c" "$root/native/vmdk_descriptor.c" "$root/native/vmdk_sparse.c" \
    "$root/native/vmdk_writer.c" "$here/fuzz_vmdk.c" -lz -o "$bin"

# ---- seed corpus (inputs: one mode byte, then file(s); see fuzz_vmdk.c) ----
if [ -z "$(ls -A "$work/seeds")" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 - "$tmp/src.raw" <<'EOF'
import random, sys
rnd = random.Random(1)
with open(sys.argv[1], "wb") as f:
    size = 33 * 1024 * 1024 + 5000          # two grain tables, a partial last grain
    f.truncate(size)
    for off, data in [(0, b"boot" * 30), (30000, rnd.randbytes(3000)),
                      (32 * 1024 * 1024 - 100, rnd.randbytes(300)), (size - 9, b"123456789")]:
        f.seek(off)
        f.write(data)
EOF
    for sub in monolithicSparse streamOptimized monolithicFlat twoGbMaxExtentSparse twoGbMaxExtentFlat; do
        qemu-img convert -q -f raw -O vmdk -o subformat="$sub" "$tmp/src.raw" "$tmp/$sub.vmdk"
    done
    qemu-img create -q -f vmdk -o zeroed_grain=on "$tmp/zg.vmdk" 1M
    qemu-io -c 'write -P 0x5a 0 128k' -c 'write -z 64k 64k' "$tmp/zg.vmdk" >/dev/null
    python3 - "$tmp" "$work/seeds" "$root/tests/native" <<'EOF'
import os, re, sys
tmp, seeds, tests = sys.argv[1:4]
sys.path.insert(0, tests)
SEP = b"@@@@\n"

def put(name, data):
    with open(os.path.join(seeds, name), "wb") as f:
        f.write(data)

def read(name):
    with open(os.path.join(tmp, name), "rb") as f:
        return f.read()

def trim_flat(data):
    # Flat extents are mostly holes: keep the seeds small (the descriptor is
    # rewritten to the trimmed size).
    data = data[:128 * 1024]
    return data + bytes(-len(data) % 512)

for sub in ("monolithicSparse", "streamOptimized"):
    put(f"single-{sub}", b"\0" + read(f"{sub}.vmdk"))
put("single-zeroed-grain", b"\0" + read("zg.vmdk"))
for sub in ("monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
    desc = read(f"{sub}.vmdk").rstrip(b" \0")
    names = re.findall(rb'"([^"]+-[fs]\d+\.vmdk|[^"]+-flat\.vmdk)"', desc)
    parts = []
    for i, n in enumerate(names[:4]):
        blob = read(n.decode())
        if "Flat" in sub:
            blob = trim_flat(blob)
            desc = re.sub(rb'RW \d+ FLAT "' + re.escape(n) + b'"',
                          b'RW %d FLAT "x%d.vmdk"' % (len(blob) // 512, i), desc)
        else:
            desc = desc.replace(b'"' + n + b'"', b'"x%d.vmdk"' % i)
        parts.append(blob)
    put(f"multi-{sub}", b"\1" + SEP.join([desc] + parts))
# A small descriptor mixing every extent kind, and one descriptor alone.
mixed = (b'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
         b'createType="twoGbMaxExtentSparse"\n\n# Extent description\n'
         b'RW 16 FLAT "x0.vmdk" 2\nRDONLY 100 ZERO\nRW 2048 SPARSE "x1.vmdk"\nRW 4 VMFS "x0.vmdk"\n'
         b'\n#DDB\nddb.adapterType = "ide"\n')
put("multi-mixed", b"\1" + SEP.join([mixed, bytes(range(256)) * 40, read("zg.vmdk")]))
put("single-descriptor", b"\0" + read("monolithicFlat.vmdk").rstrip(b" \0"))
# Tiny hand-built sparse files (grains of 1-2 sectors, 4-8 entries per grain
# table, several tables, zeroed-grain entries, a partial last grain): header
# fields are a large share of these inputs, so mutations reach them often.
import struct, zlib
def tiny_sparse(grain, gtes, cap, grains, zero=(), version=1, flags=0x3):
    ngt = -(-cap // (grain * gtes))
    gt_sec = -(-gtes * 4 // 512)
    gd_sec = -(-ngt * 4 // 512)
    desc = (b'# Disk DescriptorFile\nversion=1\nCID=2\nparentCID=ffffffff\n'
            b'createType="monolithicSparse"\nRW %d SPARSE "t.vmdk"\n' % cap)
    gd_off = 2
    gt0 = gd_off + gd_sec
    data_off = gt0 + ngt * gt_sec
    tables = [[0] * gtes for _ in range(ngt)]
    body = bytearray()
    for g in grains:
        tables[g // gtes][g % gtes] = data_off + len(body) // 512
        body += bytes([0x40 + g % 64]) * (grain * 512 - 1) + b"\xee"
    for g in zero:
        tables[g // gtes][g % gtes] = 1
    hdr = struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", version, flags, cap, grain, 1, 1, gtes,
                      0, gd_off, data_off, 0, b"\n \r\n", 0).ljust(512, b"\0")
    out = bytearray(hdr) + desc.ljust(512, b"\0")
    out += struct.pack("<%dI" % ngt, *[gt0 + i * gt_sec for i in range(ngt)]).ljust(gd_sec * 512, b"\0")
    for t in tables:
        out += struct.pack("<%dI" % gtes, *t).ljust(gt_sec * 512, b"\0")
    return bytes(out + body)
put("tiny-sparse", b"\0" + tiny_sparse(2, 4, 37, [0, 3, 5, 9, 18], zero=[1, 6], version=2, flags=0x7))
put("tiny-sparse-1s", b"\0" + tiny_sparse(1, 8, 30, [0, 1, 2, 17, 29]))
# Descriptors the reader must refuse: one sparse file named twice, a COWD extent.
put("multi-sparse-twice", b"\1" + SEP.join([
    b'createType="twoGbMaxExtentSparse"\nRW 37 SPARSE "x0.vmdk"\nRW 37 SPARSE "x0.vmdk"\n',
    tiny_sparse(2, 4, 37, [0, 3])]))
put("multi-cowd", b"\1" + SEP.join([
    b'createType="vmfsSparse"\nRW 64 SPARSE "x0.vmdk"\n', b"COWD" + bytes(2044)]))
# Mode bit 1: the file gets a trailing hole ((mode >> 2) & 63) * 16 KiB long.
put("tiny-sparse-hole", bytes([0x02 | (40 << 2)]) + tiny_sparse(8, 512, 4200, [0, 7, 520], zero=[3]))
put("tiny-sparse-1s-hole", bytes([0x02 | (5 << 2)]) + tiny_sparse(1, 8, 30, [0, 29]))
put("multi-tiny", b"\1" + SEP.join([
    b'# Disk DescriptorFile\nversion=1\nCID=3\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n'
    b'RW 37 SPARSE "x0.vmdk"\nRW 4 ZERO\nRW 3 FLAT "x1.vmdk" 1\nRW 30 SPARSE "x2.vmdk"\n',
    tiny_sparse(2, 4, 37, [0, 3, 18]), b"\xab" * 2048, tiny_sparse(1, 8, 30, [2, 29])]))
try:
    import test_vmdk
    tiny = bytearray(40 * 512 + 100)
    tiny[0:700] = b"z" * 700
    tiny[5000:9000] = os.urandom(4000)
    tiny[-50:] = b"e" * 50
    put("tiny-footer-stream", b"\0" + test_vmdk.make_footer_stream(bytes(tiny), grain_sectors=2, gtes=4))
    raw = bytearray(2 * 1024 * 1024 + 1536)
    raw[1000:1100] = b"x" * 100
    raw[300000:400000] = os.urandom(100000)
    put("single-footer-stream", b"\0" + test_vmdk.make_footer_stream(bytes(raw)))
except Exception as e:  # pytest missing: the qemu-img seeds are enough
    print("no footer-stream seed:", e, file=sys.stderr)
EOF
    ls -l "$work/seeds"
fi

cat > "$work/vmdk.dict" <<'EOF'
"KDMV"
"COWD"
"@@@@\x0a"
"createType="
"parentCID="
"RW "
"RDONLY "
"NOACCESS "
" FLAT "
" SPARSE "
" ZERO"
" VMFS "
" VMFSSPARSE "
"\x22x0.vmdk\x22"
"\x22x1.vmdk\x22"
"\x0a \x0d\x0a"
"\xff\xff\xff\xff\xff\xff\xff\xff"
"\x00\x02\x00\x00"
"\x80\x00\x00\x00\x00\x00\x00\x00"
"\x03\x00\x00\x00"
"\x01\x00\x03\x00"
"\x78\x9c"
EOF

echo "fuzzing for ${secs}s ..."
scratch="$(mktemp -d /dev/shm/fuzz_vmdk_run.XXXXXX 2>/dev/null || mktemp -d)"
trap 'rm -rf "$scratch" ${tmp:+"$tmp"}' EXIT
set +e
( cd "$work" && FUZZ_VMDK_TMP="$scratch" ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$bin" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len=400000 \
    -dict="$work/vmdk.dict" -use_value_profile=1 -artifact_prefix="$work/artifacts/" -print_final_stats=1 \
    "$work/corpus" "$work/seeds" ) 2>&1 | tee "$work/last_run.log" | grep -v '^#[0-9].*\(pulse\|REDUCE\|NEW\)' || true
set -e

found=0
for f in "$work"/artifacts/crash-* "$work"/artifacts/leak-* "$work"/artifacts/timeout-* \
         "$work"/artifacts/oom-* "$work"/artifacts/slow-unit-*; do
    [ -e "$f" ] || continue
    cp -n "$f" "$regress/" && echo "regression case: $regress/$(basename "$f")"
    rm -f "$f"
    found=1
done
grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|#[0-9]+.*DONE)' \
    "$work/last_run.log" || true
if [ "$found" = 1 ]; then
    echo "the fuzzer found problems; inputs copied to $regress" >&2
    exit 1
fi
