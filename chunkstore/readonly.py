"""Reading a store nobody may write: a read-only mount, a snapshot, a copy.

A store on a read-only file system cannot have its LMDB environment opened
the ordinary way (LMDB opens ``data.mdb`` for writing and creates
``lock.mdb``), and the engine's named databases cannot be created on first
use either (that takes a write transaction).  So such a store is opened
with ``readonly=True``: LMDB then reads without a lock file when the file
system refuses one (on ``EROFS`` it goes lockless by itself; for a lock file
we may not write, ``lock=False``).  Without the lock file no writer can
see our readers, which is only safe because nobody can write there either.

A database the store never created (the VM catalog of a store without VM
backups) is then simply empty: ``EMPTY`` stands for it, and read
transactions of a read-only store are wrapped so that a ``get`` in it finds
nothing and a cursor over it yields nothing.  Every writer is refused with
``StoreReadOnlyError`` before it touches anything.
"""

from __future__ import annotations

import errno
import os

import lmdb

from chunkstore.errors import StoreReadOnlyError

# Errors that mean "you may not write here" rather than "this is broken".
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


class _Empty:
    """The handle of a database a read-only store does not have."""

    def __repr__(self) -> str:
        return "<empty database>"


EMPTY = _Empty()


def read_only_message(path: str) -> str:
    return (f"the store at {path} is read-only (mounted read-only?); writing is impossible: "
            "list, verify, restore and stats work")


def refuse_write(path: str) -> StoreReadOnlyError:
    return StoreReadOnlyError(read_only_message(path))


def store_is_writable(index_dir: str) -> bool:
    """False when the index (directory or data file) may not be written by us.

    ``os.access`` consults the mount flags too, so it is False for root on
    a read-only mount, where a mode check alone would say yes."""
    data = os.path.join(index_dir, "data.mdb")
    return os.access(index_dir, os.W_OK) and (not os.path.exists(data) or os.access(data, os.W_OK))


def is_denied(err: BaseException) -> bool:
    """An LMDB open that failed because writing is not allowed (py-lmdb gives
    the strerror text, not the errno)."""
    text = str(err)
    return any(os.strerror(code) in text for code in _DENIED)


def open_read_only(index_dir: str, **options) -> lmdb.Environment:
    """The environment opened for reading only; with the lock file when LMDB
    can use it (so a writer elsewhere sees our readers), else without."""
    try:
        return lmdb.open(index_dir, readonly=True, **options)
    except lmdb.Error as e:
        if not is_denied(e):
            raise
    return lmdb.open(index_dir, readonly=True, lock=False, **options)


class ReadOnlyTxn:
    """A read transaction where ``EMPTY`` is a database without a record."""

    __slots__ = ("_txn",)

    def __init__(self, txn: lmdb.Transaction):
        self._txn = txn

    def get(self, key, default=None, db=None):
        if db is EMPTY:
            return default
        return self._txn.get(key, default, db=db) if db is not None else self._txn.get(key, default)

    def cursor(self, db=None):
        if db is EMPTY:
            return _EmptyCursor()
        return self._txn.cursor(db=db) if db is not None else self._txn.cursor()

    def stat(self, db):
        if db is EMPTY:
            return {"entries": 0, "psize": 0, "depth": 0, "branch_pages": 0, "leaf_pages": 0,
                    "overflow_pages": 0}
        return self._txn.stat(db)

    def put(self, *args, **kwargs):
        raise lmdb.ReadonlyError("the store is read-only")

    def __getattr__(self, name):
        return getattr(self._txn, name)

    def __enter__(self) -> "ReadOnlyTxn":
        self._txn.__enter__()
        return self

    def __exit__(self, *exc):
        return self._txn.__exit__(*exc)


class _EmptyCursor:
    """A cursor over a database with nothing in it."""

    def __enter__(self) -> "_EmptyCursor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self):
        return iter(())

    def close(self) -> None:
        return None

    def first(self, *args, **kwargs) -> bool:
        return False

    last = set_range = set_key = set_key_dup = set_range_dup = next = prev = first

    def iternext(self, keys=True, values=True):
        return iter(())

    iterprev = iternext

    def key(self) -> bytes:
        return b""

    def value(self) -> bytes:
        return b""

    def item(self) -> tuple[bytes, bytes]:
        return b"", b""

    def get(self, key, default=None):
        return default
