"""The backup catalog: which backups exist, per disk, in order.

Each disk has a sequence T1..Tn; a backup is called ``DISK@N``.  Entries are
JSON documents in LMDB database ``catalog`` keyed by disk name and sequence
number, so listing one disk is a range scan and the newest backup is the last
key of its range.  An entry is written in the same transaction as its
manifest and its new chunks: if it is in the catalog, it is restorable.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Iterator

from engine.errors import BadInputError, NotFoundError

CATALOG_DB = b"catalog"
KINDS = ("full", "incremental", "differential")
_DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,199}$")


def check_disk_name(name: str) -> str:
    if not _DISK_NAME.match(name or ""):
        raise BadInputError(
            f"disk name {name!r} is not allowed: use 1-200 characters from letters, digits and ._:/+- "
            "starting with a letter or digit (no '@')"
        )
    return name


def catalog_key(disk: str, seq: int) -> bytes:
    return disk.encode() + b"\0" + struct.pack(">I", seq)


@dataclass
class BackupRecord:
    disk: str
    seq: int
    time: float
    kind: str
    base: str | None
    size: int
    chunk_size: int
    change_id: str | None = None
    stats: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    # What the backup had to warn about (a source that changed, a change list
    # not used...); entries written before this field existed load as [].
    warnings: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.disk}@{self.seq}"

    @property
    def key(self) -> bytes:
        return catalog_key(self.disk, self.seq)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data) -> "BackupRecord":
        return cls(**json.loads(bytes(data)))

    def summary(self) -> dict:
        doc = asdict(self)
        doc["id"] = self.id
        return doc


def parse_ref(ref: str) -> tuple[str, str]:
    """'disk@3' → ('disk', '3'); 'disk@latest' → ('disk', 'latest')."""
    disk, sep, which = ref.rpartition("@")
    if not sep or not disk or not (which.isdigit() or which == "latest"):
        raise BadInputError(f"{ref!r} is not a backup id; write DISK@N (e.g. vm1-disk0@3) or DISK@latest")
    return check_disk_name(disk), which


class NumberedRecords:
    """Records numbered 1..n per name, JSON in one LMDB database.

    Keys are ``name \\0 seq`` (big-endian), so one name's records are a
    contiguous range in order.  The disk catalog and the VM catalog
    (engine/vsphere/vmcatalog.py) are both this, with their own record type.
    """

    record_type: type = None  # with from_json, key, seq, kind, id
    what = "backup"

    def __init__(self, db):
        self.db = db

    def put(self, txn, record) -> None:
        if not txn.put(record.key, record.to_json(), db=self.db, overwrite=False):
            raise NotFoundError(f"{self.what} {record.id} already exists")  # the writer lock makes this a bug

    def get(self, txn, name: str, seq: int):
        value = txn.get(catalog_key(name, seq), db=self.db)
        return self.record_type.from_json(value) if value is not None else None

    def for_name(self, txn, name: str) -> Iterator:
        prefix = name.encode() + b"\0"
        with txn.cursor(db=self.db) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                # Names hold no NUL, so the prefix matches this name only.
                if not bytes(key).startswith(prefix):
                    break
                yield self.record_type.from_json(value)

    def all(self, txn) -> Iterator:
        with txn.cursor(db=self.db) as cur:
            for _, value in cur:
                yield self.record_type.from_json(value)

    def latest(self, txn, name: str, kind: str | None = None):
        found = None
        for rec in self.for_name(txn, name):
            if kind is None or rec.kind == kind:
                found = rec
        return found

    def next_seq(self, txn, name: str) -> int:
        last = self.latest(txn, name)
        return last.seq + 1 if last else 1

    def _resolve(self, txn, name: str, which: str, ref: str, list_hint: str):
        rec = self.latest(txn, name) if which == "latest" else self.get(txn, name, int(which))
        if rec is None:
            known = [r.id for r in self.for_name(txn, name)]
            hint = (f"{self.what}s of {name}: {', '.join(known[-5:])}" if known
                    else f"there are no {self.what}s of {name!r}")
            raise NotFoundError(f"no {self.what} {ref}; {hint} (see '{list_hint}')")
        return rec


class Catalog(NumberedRecords):
    """Disk backups ``DISK@N``."""

    record_type = BackupRecord

    def for_disk(self, txn, disk: str) -> Iterator[BackupRecord]:
        return self.for_name(txn, disk)

    def resolve(self, txn, ref: str) -> BackupRecord:
        disk, which = parse_ref(ref)
        return self._resolve(txn, disk, which, ref, "blockvault list")
