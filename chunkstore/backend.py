"""The pack backend: where a store's sealed packs live and how they are read.

Everything else of a store (config copy, LMDB index, locks, registry, the
pack being written) is a local directory; only the sealed packs may live
elsewhere.  Every pack read, listing, scan and delete of chunkstore goes
through one ``PackBackend``, so a store in an S3 bucket
(chunkstore/s3backend.py) differs from a local one in this one object and
nowhere else.

A writer still writes and fsyncs each pack as a local file first (a local
store's pack file is its final place; an S3 store's is in the upload spool),
then hands it to ``publish``; a commit waits in ``wait_published`` for every
pack it names before its metadata pack is written and again before the LMDB
commit (docs/FORMAT.md "Commit order").  Locally both are no-ops: the fsync
was the durability.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterable, Iterator, Sequence

from chunkstore import safefs
from chunkstore.config import fsync_dir
from chunkstore.errors import IntegrityError, UnsafePathError
from chunkstore.pack import (PACK_HEADER, PackHeader, decode_pack_header, iter_pack_paths, pack_relpath,
                             read_pack_header)


class PackBackend:
    """Sealed packs by id.  Thread-safe: restores and verify read from many threads."""

    location: str = ""
    remote: bool = False   # packs are not files under the store directory

    def name(self, pack_id: bytes) -> str:
        """How messages name one pack (a path, or a URL)."""
        raise NotImplementedError

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; IntegrityError when the pack is missing or shorter."""
        raise NotImplementedError

    def size(self, pack_id: bytes) -> int | None:
        """The pack's size, None when it does not exist."""
        raise NotImplementedError

    def list(self) -> Iterator[tuple[bytes, int]]:
        """(pack id, size) of every pack, in no particular order."""
        raise NotImplementedError

    def list_named(self) -> Iterator[tuple[bytes, str]]:
        """(pack id, name) of every pack: a local pack file in the wrong directory
        is named where it is, so a report can point at it."""
        for pid, _ in self.list():
            yield pid, self.name(pid)

    def present(self, pack_id: bytes, name: str) -> bool:
        """Whether the pack ``list_named`` gave as ``name`` is still there."""
        return self.size(pack_id) is not None

    def open_named(self, pack_id: bytes, name: str) -> BinaryIO:
        """``open_stream`` of what ``list_named`` gave."""
        return self.open_stream(pack_id)

    def open_stream(self, pack_id: bytes) -> BinaryIO:
        """A reader of the whole pack (seekable: scan_pack resynchronises after damage)."""
        raise NotImplementedError

    def publish(self, pack_id: bytes, local_path: str) -> None:
        """A sealed, fsynced local pack: start making it durable where the packs live."""

    def wait_published(self, pack_ids: Iterable[bytes]) -> None:
        """Block until every pack in ``pack_ids`` is durable; StoreError when one cannot be."""

    def discard(self, pack_ids: Iterable[bytes]) -> None:
        """A session that ends without committing: forget its pending uploads and remove what
        already went out (best effort; gc removes what is left)."""

    def delete(self, pack_ids: Sequence[bytes]) -> list[tuple[bytes, str]]:
        """Remove packs; the ones that could not be removed, with why.  A missing pack is no failure."""
        raise NotImplementedError

    def locks(self, pack_ids: Sequence[bytes]) -> dict[bytes, float]:
        """The packs of ``pack_ids`` that object lock keeps from being deleted now, with the
        unix time their retention ends (gc never tries to delete them before then)."""
        return {}

    def header(self, pack_id: bytes) -> PackHeader:
        """The pack's header, checked (IntegrityError when it is not one)."""
        return decode_pack_header(self.read(pack_id, 0, PACK_HEADER.size), self.name(pack_id))

    def close(self) -> None:
        pass


def pack_id_of(name: str) -> bytes | None:
    """The pack id a file or object name ``.../<32 hex>.pack`` carries, else None."""
    base = name.rsplit("/", 1)[-1]
    if not base.endswith(".pack"):
        return None
    try:
        pid = bytes.fromhex(base[:-len(".pack")])
    except ValueError:
        return None
    return pid if len(pid) == 16 else None


class LocalPackBackend(PackBackend):
    """Packs as files ``STORE/packs/XX/ID.pack``; one open descriptor per pack read."""

    def __init__(self, store_path: str):
        self.store_path = store_path
        self.location = store_path
        self._fds: dict[bytes, int] = {}
        self._fd_lock = threading.Lock()

    def path(self, pack_id: bytes) -> str:
        return os.path.join(self.store_path, pack_relpath(pack_id))

    name = path

    def _fd(self, pack_id: bytes) -> int:
        fd = self._fds.get(pack_id)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(pack_id)
                if fd is None:
                    try:
                        fd = safefs.open_file(self.path(pack_id), os.O_RDONLY, "pack file")
                    except UnsafePathError as e:  # damage as far as readers go: verify reports it per chunk
                        raise IntegrityError(f"store {self.store_path}: {e}") from None
                    except FileNotFoundError:
                        raise IntegrityError(
                            f"store {self.store_path}: pack {pack_id.hex()} is missing "
                            f"({pack_relpath(pack_id)}); run 'blockvault verify' to see what it affects"
                        ) from None
                    self._fds[pack_id] = fd
        return fd

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(pack_id), length, offset)  # GIL released
        if len(data) != length:
            raise IntegrityError(f"store {self.store_path}: pack {pack_id.hex()} ends before offset {offset + length}")
        return data

    def header(self, pack_id: bytes) -> PackHeader:
        return read_pack_header(self.path(pack_id))

    def size(self, pack_id: bytes) -> int | None:
        try:
            return os.stat(self.path(pack_id)).st_size
        except FileNotFoundError:
            return None

    def list(self) -> Iterator[tuple[bytes, int]]:
        for path in iter_pack_paths(self.store_path):
            pid = pack_id_of(path)
            if pid is None:
                continue
            try:
                yield pid, os.stat(path).st_size
            except FileNotFoundError:  # removed since it was listed
                continue

    def list_named(self) -> Iterator[tuple[bytes, str]]:
        for path in iter_pack_paths(self.store_path):
            pid = pack_id_of(path)
            if pid is not None:
                yield pid, path

    def present(self, pack_id: bytes, name: str) -> bool:
        return os.path.exists(name)

    def open_named(self, pack_id: bytes, name: str) -> BinaryIO:
        return open(name, "rb")

    def open_stream(self, pack_id: bytes) -> BinaryIO:
        return open(self.path(pack_id), "rb")

    def delete(self, pack_ids: Sequence[bytes]) -> list[tuple[bytes, str]]:
        """Each removal is durable when this returns (a lost unlink would bring back a
        pack the index no longer knows). A directory is synced once, after all its
        unlinks, and the directories concurrently: the journal commits concurrent
        fsyncs together, where one per unlink was most of a gc's wall time."""
        by_dir: dict[str, list[bytes]] = {}
        for pid in pack_ids:
            by_dir.setdefault(os.path.dirname(self.path(pid)), []).append(pid)
        failed: list[tuple[bytes, str]] = []

        def one(item):
            directory, pids = item
            removed = []
            for pid in pids:
                try:
                    os.unlink(self.path(pid))
                    removed.append(pid)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    failed.append((pid, e.strerror or str(e)))
            if removed:
                try:
                    fsync_dir(directory)
                except OSError as e:
                    failed.extend((pid, f"directory sync: {e.strerror or e}") for pid in removed)

        items = sorted(by_dir.items())
        if len(items) <= 1:
            for item in items:
                one(item)
        else:
            with ThreadPoolExecutor(min(16, len(items)), thread_name_prefix="bv-unlink") as pool:
                list(pool.map(one, items))
        # An open descriptor stays: a reader of this process may still be in a pread (gc waits
        # for readers by generation, not by descriptor); close() releases them.
        return failed

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
