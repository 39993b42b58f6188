"""Pack files: append-only containers of chunk records.

Many chunks share one file so the store holds tens of files, not millions,
and so a pack can later become one object in S3-compatible storage.  Every
record carries its own header (digest, sizes, codec, checksums), which makes
three things possible without the index: reading one chunk by itself from
its offset (restores, later NBD access), rebuilding the index from the packs
alone, and telling a torn tail left by a crash from good data.

A pack is written by one session only, under a random name, and sealed with
a trailer record when it is full or the session ends; sealed packs are never
written again.  The byte layout is in docs/FORMAT.md ("Pack files").
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Iterator

import xxhash

from chunkstore import safefs
from chunkstore.config import fsync_dir
from chunkstore.digest import DIGEST_FIELD
from chunkstore.errors import IntegrityError

PACK_MAGIC = b"BVLTPACK"
PACK_VERSION = 2
# magic, version, reserved, store id, pack id, created (unix s), then the store's
# settings (chunk size, digest kind, zstd level, cipher code, reserved, seed, pack
# target size, store created, key check), reserved, header checksum: every pack
# can recreate config.json.  A plaintext store's cipher code and key check are 0.
PACK_HEADER = struct.Struct("<8sII16s16sQIBbBBQQd16s16sQ")
RECORD_MAGIC = b"BVCK"
METADATA_MAGIC = b"BVMD"
TRAILER_MAGIC = b"BVND"
RECORD_MAGICS = (RECORD_MAGIC, METADATA_MAGIC, TRAILER_MAGIC)
# magic, codec, digest length, reserved, raw length, stored length,
# digest (zero padded), payload checksum, header checksum
RECORD_HEADER = struct.Struct("<4sBBHII32sQQ")
assert PACK_HEADER.size == 128 and RECORD_HEADER.size == 64
RECORD_HEADER_SIZE = RECORD_HEADER.size
MAX_PAYLOAD = 16 << 20  # above any chunk size: a larger length is corruption
DIGEST_CODES = {"xxh3-128": 1, "sha256": 2, "blake3-128-keyed": 3}
# Byte 62 of a pack header: the AEAD sealing its records (0: none).  As
# chunkstore/crypto.py CIPHER_CODES, kept here so that reading a header needs
# no cryptography.
CIPHER_CODES = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
# A metadata record's 32-byte field: commit number, the commit it follows,
# part index, number of parts, commit time.
METADATA_FIELD = struct.Struct("<QQIId")
# Raw bytes per metadata record: no larger than the smallest chunk size, so
# every record of a pack obeys the same size limits.
METADATA_PART = 64 << 10


def check64(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def pack_relpath(pack_id: bytes) -> str:
    h = pack_id.hex()
    return os.path.join("packs", h[:2], h + ".pack")


@dataclass(frozen=True)
class PackHeader:
    """What a pack header says: whose pack it is, and the store's settings."""

    store_id: bytes
    pack_id: bytes
    created: int
    chunk_size: int
    digest: str
    compression_level: int
    seed: int
    pack_target_size: int
    store_created: float
    encryption: str = ""      # "" for a plaintext store's pack
    key_check: bytes = bytes(16)

    def settings(self) -> dict:
        """The fields of config.json this header carries (an encrypted store's
        cipher and key check too, so ``rebuild --config`` recreates them)."""
        doc = {"store_id": self.store_id.hex(), "chunk_size": self.chunk_size, "digest": self.digest,
               "seed": self.seed, "compression_level": self.compression_level,
               "pack_target_size": self.pack_target_size, "created": self.store_created}
        if self.encryption:
            doc.update(encryption=self.encryption, key_check=self.key_check.hex())
        return doc


def encode_pack_header(config, pack_id: bytes) -> bytes:
    """The header of a new pack of the store ``config`` (a StoreConfig)."""
    encryption = getattr(config, "encryption", "")
    body = PACK_HEADER.pack(
        PACK_MAGIC, PACK_VERSION, 0, bytes.fromhex(config.store_id), pack_id, int(time.time()),
        config.chunk_size, DIGEST_CODES[config.digest], config.compression_level,
        CIPHER_CODES[encryption] if encryption else 0, 0, config.seed, config.pack_target_size,
        float(config.created), bytes.fromhex(config.key_check) if encryption else bytes(16), bytes(16), 0)
    return body[:-8] + struct.pack("<Q", check64(body[:-8]))


def decode_pack_header(data: bytes, where: str) -> PackHeader:
    """A pack header, checked; IntegrityError when it is not one."""
    if len(data) >= 12 and data[:8] == PACK_MAGIC and struct.unpack_from("<I", data, 8)[0] == 1:
        raise IntegrityError(f"{where}: pack format version 1 is not supported (a version-1 store)")
    if len(data) < PACK_HEADER.size:
        raise IntegrityError(f"{where}: pack header truncated ({len(data)} bytes)")
    (magic, version, _, store_id, pack_id, created, chunk_size, digest, level, cipher, _, seed, target,
     store_created, key_check, _, check) = PACK_HEADER.unpack_from(data)
    if magic != PACK_MAGIC:
        raise IntegrityError(f"{where}: not a blockvault pack (bad magic)")
    if check != check64(data[:PACK_HEADER.size - 8]):
        raise IntegrityError(f"{where}: pack header checksum mismatch")
    if version != PACK_VERSION:
        raise IntegrityError(f"{where}: pack format version {version} is not supported")
    kinds = {v: k for k, v in DIGEST_CODES.items()}
    if digest not in kinds:
        raise IntegrityError(f"{where}: pack header names digest kind {digest}, which is unknown")
    ciphers = {v: k for k, v in CIPHER_CODES.items()}
    if cipher and cipher not in ciphers:
        raise IntegrityError(f"{where}: pack header names cipher {cipher}, which is unknown")
    if bool(cipher) != (kinds[digest] == "blake3-128-keyed"):
        raise IntegrityError(f"{where}: pack header pairs digest kind {digest} with cipher {cipher}: keyed ids "
                             "and sealed records go together")
    return PackHeader(store_id, pack_id, created, chunk_size, kinds[digest], level, seed, target, store_created,
                      ciphers.get(cipher, ""), key_check if cipher else bytes(16))


def read_pack_header(path: str) -> PackHeader:
    """The header of the pack file ``path`` (never followed if it is a link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return decode_pack_header(os.pread(fd, PACK_HEADER.size, 0), path)
    finally:
        os.close(fd)


def encode_record(digest: bytes, codec: int, raw_len: int, payload) -> bytes:
    head = RECORD_HEADER.pack(
        RECORD_MAGIC, codec, len(digest), 0, raw_len, len(payload),
        digest.ljust(DIGEST_FIELD, b"\0"), check64(payload), 0,
    )
    return head[:56] + struct.pack("<Q", check64(head[:56]))


def encode_trailer(record_count: int) -> bytes:
    head = RECORD_HEADER.pack(TRAILER_MAGIC, 0, 0, 0, record_count, 0, bytes(DIGEST_FIELD), 0, 0)
    return head[:56] + struct.pack("<Q", check64(head[:56]))


@dataclass(frozen=True)
class RecordHeader:
    magic: bytes
    codec: int
    digest: bytes
    raw_len: int
    stored_len: int
    payload_check: int


def decode_record_header(data, where: str, max_chunk: int = MAX_PAYLOAD, tag: int = 0) -> RecordHeader:
    """Parse and check one 64-byte record header; IntegrityError when it is not one.

    ``max_chunk`` is the store's chunk size when the caller knows it: a chunk
    record declaring more (raw or stored) is damaged or crafted, and is refused
    before its sizes are used to read or decompress anything.  ``tag``: the
    AEAD tag an encrypted store's stored length adds (ChunkStore.tag_size)."""
    if len(data) < RECORD_HEADER_SIZE:
        raise IntegrityError(f"{where}: record header truncated")
    magic, codec, dlen, _, raw_len, stored_len, digest, pcheck, hcheck = RECORD_HEADER.unpack_from(data)
    if magic not in RECORD_MAGICS:
        raise IntegrityError(f"{where}: no record here (bad magic)")
    if hcheck != check64(bytes(data[:56])):
        raise IntegrityError(f"{where}: record header checksum mismatch")
    if dlen > DIGEST_FIELD or stored_len > MAX_PAYLOAD or (magic != TRAILER_MAGIC and raw_len > MAX_PAYLOAD):
        raise IntegrityError(f"{where}: record header has impossible sizes")
    if magic == RECORD_MAGIC and (raw_len > max_chunk or stored_len > max_chunk + tag):
        raise IntegrityError(f"{where}: record declares {raw_len} bytes raw, {stored_len} stored, more than "
                             f"the store's chunk size {max_chunk}")
    if magic == METADATA_MAGIC and (dlen != METADATA_FIELD.size or raw_len > METADATA_PART):
        raise IntegrityError(f"{where}: metadata record header has impossible sizes")
    return RecordHeader(magic, codec, digest[:dlen], raw_len, stored_len, pcheck)


def check_payload(header: RecordHeader, payload, where: str) -> None:
    if len(payload) != header.stored_len:
        raise IntegrityError(f"{where}: payload truncated ({len(payload)} of {header.stored_len} bytes)")
    if check64(payload) != header.payload_check:
        raise IntegrityError(f"{where}: payload checksum mismatch")


class PackWriter:
    """One new pack file of one write session.

    Space is handed out by ``reserve`` (under the session's lock) and filled
    by ``write_at`` outside it, with the GIL released, so appending never
    holds up the other threads of the session.  Nothing written here is referenced until the session
    commits its index entries, and ``sync()`` must have returned before that
    commit: that is the ordering that keeps the index from ever pointing at
    lost bytes.
    """

    def __init__(self, store_path: str, config, before_create=None):
        self.pack_id = os.urandom(16)
        self.relpath = pack_relpath(self.pack_id)
        self.path = os.path.join(store_path, self.relpath)
        directory = os.path.dirname(self.path)
        # packs/ and packs/XX are made (0700) or checked, never followed when
        # they are links; the file is new (O_EXCL) and 0600: chunkstore/safefs.py.
        safefs.make_dir(os.path.dirname(directory), "store directory")
        safefs.make_dir(directory, "store directory")
        self._dir = directory
        if before_create is not None:  # the session's registration (chunkstore/registry.py)
            before_create(self.pack_id)
        self._fd = safefs.create_file(self.path, "pack file")
        header = encode_pack_header(config, self.pack_id)
        try:
            self.write_at(0, [header])
        except BaseException:
            self.discard()  # nothing else knows this file yet
            raise
        self.size = len(header)   # bytes reserved so far
        self.chunk_count = 0      # records (chunk and metadata), as the trailer counts them
        self.metadata = False     # a commit's metadata pack
        self.writers = 0          # threads between reserve and the end of write_at
        self.retired = False      # takes no more reservations
        self.sealed = False
        self.synced = False
        self._dir_synced = False

    def reserve(self, record_size: int) -> int:
        """Room for one record; returns its offset.  Callers serialise this."""
        offset = self.size
        self.size += record_size
        self.chunk_count += 1
        return offset

    def write_at(self, offset: int, parts: list) -> None:
        """Write ``parts`` back to back from ``offset``; headers and payloads
        go out as they are (pwritev), without being joined first."""
        parts = list(parts)
        while parts:
            try:
                n = os.pwritev(self._fd, parts[:512], offset)
            except OSError as e:
                raise OSError(e.errno, e.strerror, self.path) from None
            if n <= 0:
                raise OSError(f"{self.path}: pwritev wrote nothing at offset {offset}")
            offset += n
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if n:
                parts[0] = memoryview(parts[0])[n:]

    def seal(self) -> None:
        """Write the trailer after the last reservation; immutable from here on."""
        if not self.sealed:
            trailer = encode_trailer(self.chunk_count)
            self.write_at(self.size, [trailer])
            self.size += len(trailer)
            self.sealed = True

    def sync(self) -> None:
        """Make every written byte (and the file's name) durable."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        # A pack is written once and read rarely; keeping it cached would
        # evict the machine's working set, and every new page a backup writes
        # would first have to be reclaimed from someone else (on this 2-core
        # VM with a full page cache: a full backup's system time 1.0-1.5 s ->
        # 0.4-0.8 s).  Restores read packs from disk: about 0.2 s on 2 GiB.
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not self._dir_synced:
            fsync_dir(self._dir)
            self._dir_synced = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and delete: for a session that ends without committing."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class ScannedRecord:
    offset: int
    header: RecordHeader


@dataclass
class PackScan:
    """What a sequential read of a pack found."""

    pack_id: bytes
    size: int
    records: list
    sealed: bool = False
    torn_at: int | None = None  # offset of the first byte of a bad tail (no good record after it)
    problem: str = ""
    header_problem: str = ""    # a bad pack header (the records after it are still read)
    # Bad ranges with good records after them: (start, end, problem, digest),
    # digest being the bad record's when its header is intact (else None).
    # Unlike a torn tail no crash makes these: they are damage.
    lost: list = field(default_factory=list)


_FIND_WINDOW = 1 << 20


def _good_record_at(f, pos: int, size: int, path: str, check_payloads: bool) -> RecordHeader:
    """The record at ``pos`` if it is good, else IntegrityError."""
    f.seek(pos)
    hdr = decode_record_header(f.read(RECORD_HEADER_SIZE), f"{path}@{pos}")
    if pos + RECORD_HEADER_SIZE + hdr.stored_len > size:
        raise IntegrityError(f"{path}@{pos}: record runs past the end of the file")
    if check_payloads and hdr.magic != TRAILER_MAGIC:
        check_payload(hdr, f.read(hdr.stored_len), f"{path}@{pos}")
    return hdr


def _digest_at(f, pos: int, path: str) -> bytes | None:
    """The digest a bad record's header names, if the header itself is good."""
    f.seek(pos)
    try:
        hdr = decode_record_header(f.read(RECORD_HEADER_SIZE), path)
    except IntegrityError:
        return None
    return hdr.digest if hdr.magic == RECORD_MAGIC else None


def _next_good_record(f, start: int, size: int, path: str, check_payloads: bool) -> int | None:
    """Offset of the first good record after ``start``: records carry their
    own magic and checksums, so a scan can resynchronise after damage."""
    pos = start
    while pos < size - RECORD_HEADER_SIZE + 1:
        f.seek(pos)
        window = f.read(_FIND_WINDOW + 3)
        found = [i for i in (window.find(m) for m in RECORD_MAGICS) if i >= 0]
        if not found:
            pos += max(len(window) - 3, 1)
            continue
        cand = pos + min(found)
        try:
            _good_record_at(f, cand, size, path, check_payloads)
            return cand
        except IntegrityError:
            pos = cand + 1
    return None


def scan_pack(source, check_payloads: bool = True, pack_id: bytes | None = None) -> PackScan:
    """Walk a pack from its header to its trailer, salvaging what damage spares.

    ``source`` is a pack file's path or a seekable binary stream of the whole
    pack (``PackBackend.open_stream``; its ``name`` names it in messages, and
    ``pack_id`` stands in for the file name when the header is bad).
    A bad pack header is reported and the records are read anyway (the pack
    id is also the file name).  After a bad record the scan searches forward
    for the next good record header and goes on from there, reporting the
    range it skipped in ``lost``; a bad range that runs to the end of the
    file is a torn tail (``torn_at``), what a crash leaves in an unsealed pack.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _scan(f, os.path.getsize(source), str(source), pack_id, check_payloads)
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    return _scan(source, size, str(getattr(source, "name", "pack")), pack_id, check_payloads)


def scan_backend_pack(backend, pack_id: bytes, check_payloads: bool = True) -> PackScan:
    """scan_pack over one pack of a PackBackend (chunkstore/backend.py)."""
    with backend.open_stream(pack_id) as f:
        return scan_pack(f, check_payloads, pack_id)


def _scan(f, size: int, path: str, known_id: bytes | None, check_payloads: bool) -> PackScan:
    head = f.read(PACK_HEADER.size)
    try:
        pack_id = decode_pack_header(head, path).pack_id
    except IntegrityError as e:
        pack_id = known_id
        if pack_id is None:
            name = os.path.basename(path)[:-len(".pack")]
            try:
                pack_id = bytes.fromhex(name)
            except ValueError:
                raise e from None
            if len(pack_id) != 16:
                raise
        header_problem = str(e)
    else:
        header_problem = ""
    scan = PackScan(pack_id=pack_id, size=size, records=[], header_problem=header_problem)
    pos = PACK_HEADER.size
    while pos < size:
        try:
            hdr = _good_record_at(f, pos, size, path, check_payloads)
        except IntegrityError as e:
            resume = _next_good_record(f, pos + 1, size, path, check_payloads)
            if resume is None:
                scan.torn_at, scan.problem = pos, str(e)
                break
            scan.lost.append((pos, resume, str(e), _digest_at(f, pos, path)))
            pos = resume
            continue
        if hdr.magic == TRAILER_MAGIC:
            scan.sealed = True
            if hdr.raw_len != len(scan.records):
                scan.problem = f"trailer counts {hdr.raw_len} records, found {len(scan.records)}"
            break
        scan.records.append(ScannedRecord(pos, hdr))
        pos += RECORD_HEADER_SIZE + hdr.stored_len
    return scan


def iter_pack_paths(store_path: str) -> Iterator[str]:
    root = os.path.join(store_path, "packs")
    if not os.path.isdir(root):
        return
    for sub in sorted(os.listdir(root)):
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            if name.endswith(".pack"):
                yield os.path.join(d, name)
