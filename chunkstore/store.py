"""ChunkStore: a directory of packs, one LMDB environment, one config.

Layout (docs/FORMAT.md has the bytes)::

    STORE/config.json      format version, chunk size, digest kind + seed, zstd level
    STORE/lock             flock'ed shared by writers, exclusive by what runs alone
    STORE/locks/           per-chain locks (a disk's, a VM's) and the commit lock
    STORE/sessions/        the registry of running sessions (chunkstore/registry.py)
    STORE/index/           LMDB environment: the chunk index and, in databases
                           of their own, whatever the layer above keeps
    STORE/packs/XX/ID.pack pack files, XX = first byte of ID in hex

The LMDB environment is shared with the engine on purpose: a backup's new
index entries, its manifest and its catalog entry commit in one LMDB
transaction, after the pack bytes they point at are durable.  That single
commit is what makes a backup appear whole or not at all.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import struct

import lmdb

from chunkstore import residency, safefs
from chunkstore.backend import LocalPackBackend, PackBackend
from chunkstore.badmarks import BAD_DB
from chunkstore.codec import Codec
from chunkstore.config import CONFIG_FILE, FORMAT_VERSION, StoreConfig, fsync_dir
from chunkstore.digest import Digester
from chunkstore.errors import (ChunkNotFound, ConfigMismatchError, FormatVersionError, IndexDamagedError, IntegrityError,
                               NotAStoreError, StoreExistsError, StoreUrlError)
from chunkstore.index import CHUNKS_DB, META_DB, PACKS_DB, IndexEntry
from chunkstore.pack import (MAX_PAYLOAD, RECORD_HEADER_SIZE, check_payload, decode_record_header, iter_pack_paths,
                             pack_relpath)
from chunkstore.refs import ChunkRefs, mark_counted
from chunkstore.lock import LOCKS_DIR
from chunkstore.readonly import EMPTY, ReadOnlyTxn, is_denied, open_read_only, refuse_write, store_is_writable
from chunkstore.registry import SESSIONS_DIR
from chunkstore.s3settings import is_store_url
from chunkstore.session import WriteSession

INDEX_DIR = "index"
DATA_FILE = "data.mdb"
PACKS_DIR = "packs"
# What a store opens by name; none may be a link (chunkstore/safefs.py).
STORE_FILES = ("config.json", "lock", "index/data.mdb", "index/lock.mdb")
# Address space only: LMDB grows the file as data arrives.
MAP_SIZE = 1 << 40
MAX_DBS = 32
MAX_READ = MAX_PAYLOAD + RECORD_HEADER_SIZE  # see read_span


class ChunkStore:
    """A content-addressed store of chunks.  Thread-safe for reads."""

    def __init__(self, path: str, config: StoreConfig, env: lmdb.Environment, backend: PackBackend | None = None,
                 master=None):
        self.path = path
        # Where the sealed packs live (chunkstore/backend.py): this directory, or a bucket.
        self.backend = backend if backend is not None else LocalPackBackend(path)
        # What names the store in messages: its directory, or its s3:// URL.
        self.location = path if backend is None else backend.location
        # The owner lease of a store in a bucket (chunkstore/lease.py), held by its writers,
        # and what else such a store knows (chunkstore/s3store.py S3Context); None when local.
        self.lease = None
        self.s3 = None
        self.config = config
        self.env = env
        # A store on a read-only mount (see chunkstore/readonly.py): readers only.
        self.read_only = env.flags().get("readonly", False)
        # An encrypted store's master key (chunkstore/crypto.py) unlocks its ids and
        # records; ``cipher`` seals and opens record payloads, None in a plaintext store.
        self.cipher = None
        if config.encrypted:
            self.cipher = _record_cipher(config, master, self.location)
        # What a stored length may exceed the chunk size by: the AEAD tag of a sealed record.
        self.tag_size = 16 if self.cipher is not None else 0
        self.digester = Digester.for_config(config, master)
        self.codec = Codec(config.compression_level)
        self.chunk_size = config.chunk_size
        self.store_id = bytes.fromhex(config.store_id)
        self._dbs: dict[bytes, object] = {}
        self.chunks_db = self.db(CHUNKS_DB)
        self.packs_db = self.db(PACKS_DB)
        self.meta_db = self.db(META_DB)
        self.bad_db = self.db(BAD_DB)
        self.refs = ChunkRefs(self)
        # Set by the layer above: computes the reference counts of a format-2
        # store in a write transaction (engine/references.py); see upgrade_format.
        self.upgrader = None

    # -- opening ---------------------------------------------------------------

    @classmethod
    def init(cls, path: str, cache: str | None = None, s3_settings=None, object_lock_days: float | None = None,
             lease_bucket: str | None = None, **settings) -> "ChunkStore":
        """Create a store in an empty (or missing) directory, or at ``s3://BUCKET/PREFIX``
        with its cache directory ``cache`` (chunkstore/s3store.py).  ``settings`` are
        StoreConfig.new's; an encrypted store's ``encryption`` comes with its ``master``."""
        if is_store_url(path):
            from chunkstore.s3store import init_s3
            return init_s3(cls, path, cache, s3_settings, object_lock_days, settings, lease_bucket)
        refuse_url(path)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise StoreExistsError(f"{path} exists and is not a directory")
            if os.listdir(path):
                raise StoreExistsError(f"{path} is not empty; init needs a new or empty directory")
        cfg = StoreConfig.new(**settings)
        master = settings.get("master")
        # 0700 directories, 0600 files (chunkstore/safefs.py): the store holds
        # the digest seed and every disk's data.  An empty directory given to
        # init becomes 0700 too.
        os.makedirs(path, mode=safefs.DIR_MODE, exist_ok=True)
        os.chmod(path, safefs.DIR_MODE)
        for sub in (PACKS_DIR, INDEX_DIR):
            safefs.make_dir(os.path.join(path, sub), "store directory")
        env = _open_env(path, create=True)
        store = cls(path, cfg, env, master=master)
        with env.begin(write=True) as txn:  # a new store keeps the counts from its first commit
            mark_counted(txn, store.meta_db)
        # The config goes last: a directory without one is not a store, so a
        # crash during init leaves nothing that looks half-made.
        cfg.save(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        return store

    @classmethod
    def open(cls, path: str, cache: str | None = None, s3_settings=None, master=None) -> "ChunkStore":
        """Open the store in directory ``path``, or at ``s3://BUCKET/PREFIX`` through the
        cache directory ``cache`` that ``init`` or ``attach`` made; an encrypted store
        needs its ``master`` key (chunkstore/crypto.py)."""
        if is_store_url(path):
            from chunkstore.s3store import open_s3
            return open_s3(cls, path, cache, s3_settings)
        refuse_url(path)
        require_config(path)
        cfg = StoreConfig.load(path)
        # Before LMDB opens (and may truncate) index/lock.mdb, and before a
        # writer follows packs/XX anywhere: a store holds no links.
        safefs.check_tree(path, STORE_FILES, (INDEX_DIR, PACKS_DIR, LOCKS_DIR, SESSIONS_DIR), PACKS_DIR)
        check_config(path, cfg, LocalPackBackend(path))
        if not os.path.isdir(os.path.join(path, INDEX_DIR)):
            raise NotAStoreError(f"{path}: store index directory '{INDEX_DIR}' is missing; run "
                                 f"'blockvault rebuild {path}' to recreate the index from the packs")
        env = _open_env(path, create=False)
        return cls(path, cfg, env, master=master)

    def release_map(self) -> None:
        """Unmap the index pages this process touched (chunkstore/residency.py):
        a long writer calls it after each of its transactions."""
        residency.release(os.path.join(self.path, INDEX_DIR, DATA_FILE))

    def db(self, name: bytes):
        """A named LMDB database of this store's environment (created on first use;
        in a read-only store, one that does not exist is ``EMPTY``)."""
        handle = self._dbs.get(name)
        if handle is None and self.read_only:
            try:
                handle = self.env.open_db(name, create=False)
            except lmdb.NotFoundError:
                handle = EMPTY
            self._dbs[name] = handle
        elif handle is None:
            # py-lmdb opens named databases in a short write transaction of
            # its own; LMDB shares the handle with every later transaction.
            handle = self.env.open_db(name, create=True)
            self._dbs[name] = handle
        return handle

    def db_if_exists(self, name: bytes):
        """The database ``name`` if the store has it, else None; never creates it
        (a database that exists only once something was written to it)."""
        handle = self._dbs.get(name)
        if handle is None:
            try:
                handle = self.env.open_db(name, create=False)
            except lmdb.NotFoundError:
                return None
            self._dbs[name] = handle
        return None if handle is EMPTY else handle

    def close(self) -> None:
        if self.lease is not None:
            self.lease.stop()
        self.backend.close()
        self.env.close()

    def take_lease(self, take_over: bool = False) -> None:
        """A writer of a store in a bucket holds its lease from its first write session on."""
        if self.s3 is not None and self.lease is None:
            self.lease = self.s3.take_lease(take_over)

    def check_owner(self) -> None:
        """Called before every LMDB commit of a writer: on a store in a bucket, the
        lease must still be ours (LeaseLost otherwise); a local store's locks suffice."""
        if self.lease is not None:
            self.lease.check()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------

    def read_txn(self) -> lmdb.Transaction:
        txn = self.env.begin(buffers=False)
        return ReadOnlyTxn(txn) if self.read_only else txn

    def lookup(self, txn, digest: bytes) -> IndexEntry | None:
        value = txn.get(digest, db=self.chunks_db)
        if value is None:
            return None
        entry = IndexEntry.decode(value)
        if entry.raw_len > self.chunk_size or entry.stored_len > self.chunk_size + self.tag_size:
            # Its sizes decide how much is read and decompressed: never trust them past a chunk.
            raise IntegrityError(f"store {self.path}: chunk {digest.hex()}: its index entry declares "
                                 f"{entry.raw_len} bytes raw, {entry.stored_len} stored, more than the chunk "
                                 f"size {self.chunk_size}; run 'blockvault rebuild-index'")
        return entry

    def require(self, txn, digest: bytes) -> IndexEntry:
        entry = self.lookup(txn, digest)
        if entry is None:
            raise ChunkNotFound(f"store {self.path}: chunk {digest.hex()} is not in the index")
        return entry

    def pack_path(self, pack_id: bytes) -> str:
        return os.path.join(self.path, pack_relpath(pack_id))

    def read_span(self, pack_id: bytes, offset: int, length: int) -> bytes:
        """Raw bytes of a pack (several adjacent records at once), from its backend.

        Callers read at most 8 MiB or one record at once; a longer read comes
        from a damaged index entry and is refused before its buffer exists."""
        if length > MAX_READ:
            raise IntegrityError(f"store {self.path}: pack {pack_id.hex()}: a read of {length} bytes at offset "
                                 f"{offset} is larger than any record; the index is damaged: run "
                                 "'blockvault rebuild-index'")
        return self.backend.read(pack_id, offset, length)

    def decode_chunk(self, span, at: int, entry: IndexEntry, digest: bytes, check_digest: bool = True) -> bytes:
        """The raw chunk whose record starts at ``span[at]``, checked at every level:
        framing, payload check, (in an encrypted store) authentication at its
        pack and offset, decompression, digest."""
        hdr, payload, where = self._open(span, at, entry, digest)
        try:
            raw = self.codec.decode(hdr.codec, payload, hdr.raw_len)
        except IntegrityError as e:
            raise IntegrityError(f"{where}: {e}") from None
        if check_digest and self.digester(raw) != digest:
            raise IntegrityError(f"{where}: content does not hash to its digest")
        return raw

    def open_record(self, span, at: int, entry: IndexEntry, digest: bytes):
        """(header, payload) of the record at ``span[at]``: framing and payload
        check against the index entry, and in an encrypted store the payload
        opened (authenticated: a changed, moved or foreign record is refused
        here, never decrypted into wrong data).  The payload is still compressed."""
        return self._open(span, at, entry, digest)[:2]

    def _open(self, span, at: int, entry: IndexEntry, digest: bytes):
        where = f"store {self.path}: chunk {digest.hex()} (pack {entry.pack_id.hex()} offset {entry.offset})"
        view = memoryview(span)
        head = view[at:at + RECORD_HEADER_SIZE]
        hdr = decode_record_header(head, where, self.chunk_size, self.tag_size)
        if hdr.digest != digest or hdr.stored_len != entry.stored_len or hdr.raw_len != entry.raw_len:
            raise IntegrityError(f"{where}: record header does not match the index")
        start = at + RECORD_HEADER_SIZE
        payload = view[start:start + hdr.stored_len]
        check_payload(hdr, payload, where)
        if self.cipher is not None:
            from chunkstore.recordseal import open_payload
            payload = open_payload(self.cipher, entry.pack_id, entry.offset, head, payload, where)
        return hdr, payload, where

    def read_chunk(self, digest: bytes, entry: IndexEntry | None = None) -> bytes:
        if entry is None:
            with self.read_txn() as txn:
                entry = self.require(txn, digest)
        span = self.read_span(entry.pack_id, entry.offset, RECORD_HEADER_SIZE + entry.stored_len)
        return self.decode_chunk(span, 0, entry, digest)

    # -- writing ---------------------------------------------------------------

    def upgrade_format(self) -> None:
        """Make a format-2 store format 3, by its first writer (who holds the lock).

        One LMDB transaction computes every reference count from the
        manifests (the layer above's ``upgrader``), then config.json is
        rewritten atomically.  A crash between the two leaves a version-2
        config over an index with counts: the next writer counts again.
        Readers never upgrade."""
        if self.config.version >= FORMAT_VERSION:
            return
        current = StoreConfig.load(self.path)  # another writer may have upgraded it while we waited
        if current.version >= FORMAT_VERSION:
            self.config = current
            return
        if self.upgrader is None:
            raise FormatVersionError(f"{self.path} has store format version {self.config.version}; only blockvault's "
                                     "engine can upgrade it (run any blockvault backup or gc on it)")
        with self.env.begin(write=True) as txn:
            summary = self.upgrader(txn)
        old = self.config.version
        self.config = dataclasses.replace(self.config, version=FORMAT_VERSION)
        self.config.save(self.path)
        logging.getLogger("blockvault.store").warning(
            "store %s upgraded from format version %d to %d (%s); blockvault releases before it can no longer "
            "write it", self.path, old, FORMAT_VERSION, summary)

    def writer(self, wait: float = 0.0, purpose: str = "backup", kind: str = "backup",
               chains=()) -> WriteSession:
        """A write session (see chunkstore/session.py), registered as ``kind``
        and holding the locks of ``chains`` ((kind, name) pairs: a backup's
        disk, a VM) besides the shared store lock."""
        if self.read_only:
            raise refuse_write(self.path)
        self.take_lease()
        return WriteSession(self, wait, purpose, kind, chains)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: str) -> None:
    """Stores are local directories; ``s3://b/x`` would otherwise become ``./s3:/b/x``."""
    if not _URL.match(path or "") or is_store_url(path):
        return
    scheme = path.split("://", 1)[0]
    if scheme.lower() == "vddk":
        raise StoreUrlError(f"{path} is a vSphere disk, not a store: a vddk:// URL is a backup SOURCE or a "
                            "restore TARGET; STORE, a directory, comes first (blockvault backup STORE SOURCE ...)")
    if scheme.lower() == "file":
        raise StoreUrlError(f"{path}: give the store as a path ({path.split('://', 1)[1] or '/'}), not a URL")
    raise StoreUrlError(f"{path}: a store must be a local directory or s3://BUCKET/PREFIX; {scheme}:// stores "
                        "are not supported yet; mount the file system and give its path")


def require_config(path: str) -> None:
    """A directory of packs without config.json is a store that lost its config: say how to recreate it."""
    if (os.path.isdir(path) and not os.path.exists(os.path.join(path, CONFIG_FILE))
            and next(iter_pack_paths(path), None) is not None):
        raise NotAStoreError(
            f"{path}: {CONFIG_FILE} is missing, but the directory holds blockvault packs; run "
            f"'blockvault rebuild --config {path}' to recreate it from the settings in the pack headers")


def check_config(path: str, cfg: StoreConfig, backend: PackBackend | None = None, packs: int = 3) -> None:
    """Compare config.json with the first few pack headers (each carries the
    store's settings): an edited or swapped config.json would otherwise make
    every chunk hash to the wrong digest and every restore fail obscurely."""
    backend = backend if backend is not None else LocalPackBackend(path)
    mine = {"store_id": cfg.store_id, "chunk_size": cfg.chunk_size, "digest": cfg.digest, "seed": cfg.seed,
            "encryption": cfg.encryption, "key_check": cfg.key_check}
    for pack_id, _ in itertools.islice(backend.list(), packs):
        pack = backend.name(pack_id)
        try:
            theirs = backend.header(pack_id).settings()
        except (IntegrityError, OSError):
            continue  # a damaged header is verify's business
        differ = [k for k in mine if theirs.get(k, "") != mine[k]]
        if differ:
            raise ConfigMismatchError(
                f"{path}: {CONFIG_FILE} disagrees with the pack headers ({', '.join(differ)} differ"
                f", e.g. in {pack}): with these settings no backup can be restored; if {CONFIG_FILE} was "
                f"edited or copied from another store, run 'blockvault rebuild --config {path}' to rewrite "
                "it from the packs (the current one is kept beside it)")


# LMDB meta pages (pages 0 and 1): page header (16 bytes), then magic, version,
# address, map size, two 48-byte database records (the first one's first
# field is the page size), last page number, transaction id.
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II QQ I44x 48x QQ")


def check_index_file(path: str) -> None:
    """Refuse an LMDB file that is truncated or not LMDB before it is mapped:
    LMDB trusts its meta page, and reading a page past the end of a mapped
    file kills the process with SIGBUS."""
    data_mdb = os.path.join(path, INDEX_DIR, DATA_FILE)
    problem = index_file_problem(data_mdb)
    if problem:
        raise IndexDamagedError(
            f"store {path}: the index {data_mdb} {problem}; the backups cannot be listed or restored until "
            f"it is rebuilt: run 'blockvault rebuild {path}' (it moves a damaged file aside and recreates the "
            "index, every backup included, from the packs)")


def index_file_problem(data_mdb: str) -> str:
    """What is wrong with an LMDB data file ("" if nothing is seen)."""
    try:
        with open(data_mdb, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return ""  # LMDB initialises an empty file
            head = f.read(16 + _META.size)
            metas = []
            if len(head) == 16 + _META.size:
                metas.append(_META.unpack_from(head, 16))
                psize = metas[0][4]
                if metas[0][0] == _LMDB_MAGIC and psize in {1 << k for k in range(9, 17)}:
                    f.seek(psize)
                    other = f.read(16 + _META.size)
                    if len(other) == 16 + _META.size:
                        metas.append(_META.unpack_from(other, 16))
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not metas or metas[0][0] != _LMDB_MAGIC or metas[0][1] != 1:
        return f"is not an LMDB file ({size} bytes, no LMDB meta page at its start)"
    psize = metas[0][4]
    if psize not in {1 << k for k in range(9, 17)}:
        return f"has an impossible page size ({psize})"
    if len(metas) < 2 or size < 2 * psize:
        return f"is truncated ({size} bytes, shorter than its two meta pages)"
    good = [m for m in metas if m[0] == _LMDB_MAGIC]
    last_pg = max(good, key=lambda m: m[6])[5]
    need = (last_pg + 1) * psize
    if size < need:
        return f"is truncated ({size} bytes; its meta page says {need})"
    return ""


def _open_env(path: str, create: bool) -> lmdb.Environment:
    index = os.path.join(path, INDEX_DIR)
    if not create:
        check_index_file(path)
        if not store_is_writable(index):
            return _open_env_read_only(path)
    try:
        env = lmdb.open(index, map_size=MAP_SIZE, max_dbs=MAX_DBS, subdir=True, create=create,
                        readahead=False, max_readers=256, mode=safefs.FILE_MODE)
    except lmdb.Error as e:
        if not create and is_denied(e):
            return _open_env_read_only(path)
        raise NotAStoreError(f"{path}: cannot open the store index: {e}") from None
    env.reader_check()  # clear reader slots left by killed processes
    return env


def _open_env_read_only(path: str) -> lmdb.Environment:
    """The index of a store we may not write (chunkstore/readonly.py)."""
    try:
        return open_read_only(os.path.join(path, INDEX_DIR), map_size=MAP_SIZE, max_dbs=MAX_DBS, subdir=True,
                              readahead=False, max_readers=256)
    except lmdb.Error as e:
        raise NotAStoreError(f"{path}: cannot open the store index (read-only): {e}") from None


def _record_cipher(config: StoreConfig, master, location: str):
    """The RecordCipher of an encrypted store, once ``master`` proved to be its key."""
    from chunkstore.crypto import RecordCipher, constant_time_equal
    from chunkstore.errors import KeyRequiredError, WrongKeyError
    if master is None:
        raise KeyRequiredError(f"store {location} is encrypted; give its key: BLOCKVAULT_PASSPHRASE, "
                               "--passphrase-file FILE, --key-file FILE, or type the passphrase at the prompt")
    store_id = bytes.fromhex(config.store_id)
    if not constant_time_equal(master.check(store_id), bytes.fromhex(config.key_check)):
        raise WrongKeyError(f"store {location}: the key given is not this store's key")
    return RecordCipher(config.encryption, master, store_id)
