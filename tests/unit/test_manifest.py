import pytest

from chunkstore.errors import IntegrityError
from engine.manifest import SEGMENT_CHUNKS, Manifest, ManifestBuilder, segment_array

ZERO = b"\0" * 16


def digest_of(i: int) -> bytes:
    return i.to_bytes(16, "little") if i else b"\x01" * 16


def hasher(data: bytes) -> bytes:
    import hashlib
    return hashlib.sha256(data).digest()[:16]


class SegStore(dict):
    def load(self, d):
        return self[d]


def build(size, cs, sets, base=None, segs=None):
    segs = segs if segs is not None else SegStore()
    b = ManifestBuilder(size, cs, ZERO, hasher, segs.load, base)
    for i, d in sets:
        b.set(i, d)
    m = b.finish()
    segs.update(b.new_segments)
    return m, segs, b


def expand(m: Manifest, segs) -> list[bytes]:
    out = []
    for s in m.segments:
        out.extend(row.tobytes() for row in segment_array(segs[s], 16))
    return out


def test_full_then_overlay_shares_untouched_segments():
    cs = 65536
    n = 3 * SEGMENT_CHUNKS + 10
    size = n * cs - 100
    full, segs, _ = build(size, cs, [(i, digest_of(i + 1)) for i in range(0, n, 7)])
    assert len(full.segments) == 4 and full.n_chunks == n
    inc, segs, b = build(size, cs, [(SEGMENT_CHUNKS + 3, digest_of(999_999))], base=full, segs=segs)
    assert inc.segments[0] == full.segments[0] and inc.segments[2:] == full.segments[2:]
    assert inc.segments[1] != full.segments[1]
    assert len(b.new_segments) == 1  # an incremental writes what it touched, nothing more
    rows = expand(inc, segs)
    assert rows[SEGMENT_CHUNKS + 3] == digest_of(999_999)
    assert rows[7] == digest_of(8) and rows[8] == ZERO
    assert inc.nonzero_chunks == full.nonzero_chunks + (0 if (SEGMENT_CHUNKS + 3) % 7 == 0 else 1)


def test_grow_and_shrink_refit_the_edges():
    cs = 65536
    base, segs, _ = build(10 * cs, cs, [(i, digest_of(i + 1)) for i in range(10)])
    grown, segs, _ = build(SEGMENT_CHUNKS * cs + 5 * cs, cs, [(SEGMENT_CHUNKS + 1, digest_of(77))], base, segs)
    rows = expand(grown, segs)
    assert len(rows) == SEGMENT_CHUNKS + 5
    assert rows[:10] == [digest_of(i + 1) for i in range(10)] and rows[10] == ZERO
    assert rows[SEGMENT_CHUNKS + 1] == digest_of(77)
    shrunk, segs, _ = build(4 * cs, cs, [], grown, segs)
    assert expand(shrunk, segs) == [digest_of(i + 1) for i in range(4)]
    assert shrunk.nonzero_chunks == 4


def test_empty_disk_has_no_segments():
    m, _, _ = build(0, 65536, [])
    assert m.segments == [] and Manifest.decode(m.encode()).n_chunks == 0


def test_order_is_enforced():
    b = ManifestBuilder(10 * 65536, 65536, ZERO, hasher, lambda d: b"", None)
    b.set(3, digest_of(1))
    with pytest.raises(ValueError):
        b.set(2, digest_of(2))


def test_encoding_roundtrip_and_damage():
    m, _, _ = build(5000 * 65536, 65536, [(4, digest_of(5))])
    again = Manifest.decode(m.encode())
    assert again == m
    with pytest.raises(IntegrityError):
        Manifest.decode(m.encode()[:-3])
