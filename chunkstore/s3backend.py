"""Packs as objects ``PREFIX/packs/XX/<id>.pack`` of a bucket (chunkstore/s3bucket.py).

Writes: a sealed, fsynced pack in the cache's spool (``CACHE/packs/``) is handed
to ``publish``, which queues its upload on a small thread pool and returns;
the backup goes on reading and compressing meanwhile.  Each upload is one PUT
with ``If-None-Match: *``: a pack object is never overwritten.  Once the PUT
returned the spool file is removed.  The spool is bounded: ``publish`` waits
while more than ``spool_limit`` bytes of sealed packs wait for upload, and
since it is called by the session's sealer thread, the writers behind it wait
too (chunkstore/session.py ``SEAL_BACKLOG``).  ``wait_published`` is where a
commit learns whether every pack it names is in the bucket.

Reads: one ranged GET per ``read`` (read_span already asks for runs of
adjacent records; restore's threads keep several in flight), retried a few
times on transient failures (a radosgw restarting), with a small LRU of
recent spans for readers that come back to a chunk (serve, files).  Whole
packs (rebuild, gc, verify's metadata check) are downloaded into an unnamed
temporary file in the cache, so scan_pack can seek in them.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, Iterable, Iterator, Sequence

from chunkstore.backend import PackBackend, pack_id_of
from chunkstore.errors import AccessDenied, IntegrityError, NoSuchBucket, ObjectMissing, S3Error, StoreError

log = logging.getLogger("blockvault.s3")

UPLOAD_THREADS = 4
SPOOL_LIMIT = 256 << 20        # sealed bytes waiting for upload before writers wait
CACHE_BYTES = 32 << 20         # the LRU of recently read spans
READ_ATTEMPTS = 5              # our own rounds around the bucket's retries, for reads
UPLOAD_ATTEMPTS = 3
PREFETCH = 4                   # whole packs downloaded at once by prefetch (attach, rebuild)
_PAUSE = 1.0


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}.pack"


def _transient(e: BaseException) -> bool:
    """Worth another try: the endpoint did not answer or failed (5xx); not a refusal."""
    return isinstance(e, S3Error) and not isinstance(e, (AccessDenied, NoSuchBucket, ObjectMissing))


class _Download:
    """A whole pack in a temporary file: seekable, named like the object for messages."""

    def __init__(self, f, name: str):
        self._f, self.name = f, name

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class S3PackBackend(PackBackend):
    remote = True

    def __init__(self, bucket, tmp_dir: str, threads: int = UPLOAD_THREADS, spool_limit: int = SPOOL_LIMIT,
                 retain_days: float | None = None):
        self.bucket = bucket
        self.location = bucket.url
        self.tmp_dir = tmp_dir
        self.spool_limit = spool_limit
        self.retain_days = retain_days   # object lock: every pack written with a COMPLIANCE retention
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bv-upload")
        self._uploads: dict[bytes, Future] = {}
        self._cond = threading.Condition()
        self._spooled = 0                # bytes published and not yet uploaded
        self._failure: BaseException | None = None
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self.uploaded_bytes = 0
        self.uploaded_packs = 0

    def name(self, pack_id: bytes) -> str:
        return f"{self.bucket.url}/{pack_key(pack_id)}"

    # -- reading ---------------------------------------------------------------

    def _retrying(self, what: str, call):
        for attempt in range(READ_ATTEMPTS):
            try:
                return call()
            except S3Error as e:
                if not _transient(e) or attempt == READ_ATTEMPTS - 1:
                    raise
                log.info("%s: %s; retrying in %.0f s (attempt %d of %d)", what, e, _PAUSE * (attempt + 1),
                         attempt + 2, READ_ATTEMPTS)
                time.sleep(_PAUSE * (attempt + 1))

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        key = (pack_id, offset, length)
        with self._cache_lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        try:
            data = self._retrying(f"GET {self.name(pack_id)}",
                                  lambda: self.bucket.get_range(pack_key(pack_id), offset, length))
        except ObjectMissing:
            raise IntegrityError(f"store {self.location}: pack {pack_id.hex()} is missing ({pack_key(pack_id)}); "
                                 "run 'blockvault verify' to see what it affects") from None
        if len(data) != length:
            if self.size(pack_id) is None:
                raise IntegrityError(f"store {self.location}: pack {pack_id.hex()} is missing "
                                     f"({pack_key(pack_id)}); run 'blockvault verify' to see what it affects")
            raise IntegrityError(f"store {self.location}: pack {pack_id.hex()} ends before offset {offset + length}")
        if length <= CACHE_BYTES // 8:
            with self._cache_lock:
                if key not in self._cache:
                    self._cache[key] = data
                    self._cache_bytes += length
                    while self._cache_bytes > CACHE_BYTES:
                        _, old = self._cache.popitem(last=False)
                        self._cache_bytes -= len(old)
        return data

    def size(self, pack_id: bytes) -> int | None:
        info = self._retrying(f"HEAD {self.name(pack_id)}", lambda: self.bucket.head(pack_key(pack_id)))
        return None if info is None else info.size

    def list(self) -> Iterator[tuple[bytes, int]]:
        for info in self.bucket.list("packs/"):
            pid = pack_id_of(info.key)
            if pid is not None:
                yield pid, info.size

    def open_stream(self, pack_id: bytes) -> BinaryIO:
        def fetch():
            f = tempfile.TemporaryFile(dir=self.tmp_dir)
            try:
                with self.bucket.open_stream(pack_key(pack_id)) as body:
                    while True:
                        block = body.read(1 << 20)
                        if not block:
                            break
                        f.write(block)
                f.seek(0)
                return f
            except BaseException:
                f.close()
                raise
        try:
            f = self._retrying(f"GET {self.name(pack_id)}", fetch)
        except ObjectMissing:
            raise FileNotFoundError(2, "no such pack object", self.name(pack_id)) from None
        return _Download(f, self.name(pack_id))  # type: ignore[return-value]

    def prefetch(self, pack_ids: list, fn) -> Iterator:
        """``fn(pack_id)`` for every id, PREFETCH of them at once, results in order (attach:
        the downloads of the next packs overlap the scan of this one)."""
        with ThreadPoolExecutor(PREFETCH, thread_name_prefix="bv-fetch") as pool:
            window: collections.deque = collections.deque()
            it = iter(pack_ids)
            for pid in it:
                window.append(pool.submit(fn, pid))
                if len(window) >= PREFETCH:
                    break
            while window:
                result = window.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(fn, nxt))
                yield result

    # -- writing ---------------------------------------------------------------

    def publish(self, pack_id: bytes, local_path: str) -> None:
        size = os.path.getsize(local_path)
        with self._cond:
            while self._spooled > 0 and self._spooled + size > self.spool_limit and self._failure is None:
                self._cond.wait()
            if self._failure is not None:
                raise StoreError(f"an upload to {self.location} failed earlier: {self._failure}") from self._failure
            self._spooled += size
            self._uploads[pack_id] = self._pool.submit(self._upload, pack_id, local_path, size)

    def _upload(self, pack_id: bytes, path: str, size: int) -> None:
        try:
            retain = time.time() + self.retain_days * 86400 if self.retain_days else None
            for attempt in range(UPLOAD_ATTEMPTS):
                try:
                    with open(path, "rb") as f:
                        created = self.bucket.put_new(pack_key(pack_id), f, retain_until=retain)
                    break
                except S3Error as e:
                    if not _transient(e) or attempt == UPLOAD_ATTEMPTS - 1:
                        raise
                    log.info("PUT %s: %s; retrying", self.name(pack_id), e)
                    time.sleep(_PAUSE * (attempt + 1))
            if not created:
                # Ids are 128 random bits: an object of that name is our own earlier attempt
                # (a PUT retried after its answer was lost) if and only if it is the same size.
                info = self.bucket.head(pack_key(pack_id))
                if info is None or info.size != size:
                    raise StoreError(f"{self.name(pack_id)} already exists in the bucket with other content "
                                     f"({'gone again' if info is None else f'{info.size} bytes, not {size}'}); "
                                     "pack objects are never overwritten: nothing was committed")
            os.unlink(path)   # durable in the bucket: the spool copy goes
            with self._cond:
                self.uploaded_bytes += size
                self.uploaded_packs += 1
        except BaseException as e:
            with self._cond:
                self._failure = self._failure or e
            raise
        finally:
            with self._cond:
                self._spooled -= size
                self._cond.notify_all()

    def wait_published(self, pack_ids: Iterable[bytes]) -> None:
        for pid in pack_ids:
            with self._cond:
                future = self._uploads.get(pid)
            if future is None:
                raise StoreError(f"pack {pid.hex()} was never handed to the uploader of {self.location}; "
                                 "nothing committed")
            try:
                future.result()
            except StoreError as e:
                raise StoreError(f"pack {pid.hex()} could not be uploaded to {self.location}, so nothing was "
                                 f"committed: {e}") from e
            except OSError as e:
                raise StoreError(f"pack {pid.hex()} could not be uploaded to {self.location} ({e}); nothing "
                                 "was committed") from e

    def discard(self, pack_ids: Iterable[bytes]) -> None:
        gone = []
        for pid in pack_ids:
            with self._cond:
                future = self._uploads.pop(pid, None)
            if future is None:
                continue
            if future.cancel():
                continue
            try:
                future.result()
            except BaseException:
                continue       # never reached the bucket (or we cannot know: gc looks)
            gone.append(pid)
        if gone:
            failed = self.delete(gone)
            if failed:
                log.warning("%d uploaded pack(s) of an aborted session stay in %s until gc: %s", len(failed),
                            self.location, failed[0][1])

    def locks(self, pack_ids: Sequence[bytes]) -> dict[bytes, float]:
        """One GET retention per pack (8 in flight), on an object-lock store only."""
        if not self.retain_days or not pack_ids:
            return {}
        now = time.time()
        with ThreadPoolExecutor(8, thread_name_prefix="bv-retention") as pool:
            untils = list(pool.map(lambda pid: self.bucket.retention(pack_key(pid)), pack_ids))
        return {pid: until for pid, until in zip(pack_ids, untils) if until is not None and until > now}

    def delete(self, pack_ids: Sequence[bytes]) -> list[tuple[bytes, str]]:
        ids = {pack_key(pid): pid for pid in pack_ids}
        if not ids:
            return []
        try:
            failed = self.bucket.delete(list(ids))
        except S3Error as e:
            return [(pid, str(e)) for pid in ids.values()]
        return [(ids[key], why) for key, why in failed if key in ids]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def clear_tmp(tmp_dir: str) -> None:
    """The directory of downloads.  They are unnamed files (O_TMPFILE), so nothing is ever
    left in it, and another process of this host may be downloading there right now."""
    os.makedirs(tmp_dir, mode=0o700, exist_ok=True)
