"""The backup catalog: which backups exist, per disk, in order.

Each disk has a sequence T1..Tn; a backup is called ``DISK@N``, and may be
named ``DISK@latest``, ``DISK@-K`` (K before the latest) or ``DISK@YYYY-MM-DD``
(the last of that local day) wherever an id is taken.  Entries are
JSON documents in LMDB database ``catalog`` keyed by disk name and sequence
number, so listing one disk is a range scan and the newest backup is the last
key of its range.  An entry is written in the same transaction as its
manifest and its new chunks: if it is in the catalog, it is restorable.
"""

from __future__ import annotations

import datetime
import json
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from chunkstore.errors import IntegrityError
from engine.errors import BadInputError, NotFoundError, UsageError

CATALOG_DB = b"catalog"
# name of a chain's catalog + 0 + the chain's name -> u32 BE: the lowest
# sequence number the chain may still use, written when its newest point is
# deleted (engine/forget.py), so a number never names two different points.
NEXT_SEQ_DB = b"next_seq"
KINDS = ("full", "incremental", "differential")
# fullmatch, not match with "$": "$" also matches before a trailing newline,
# which let "d\n" through as a disk name.
_DISK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,199}")


def check_disk_name(name: str) -> str:
    """The name, if it may name a disk; ``repr`` in the refusal shows control characters escaped."""
    if not isinstance(name, str) or not _DISK_NAME.fullmatch(name):
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
    # Set by ``protect`` / ``note`` (engine/pointflags.py); entries written
    # before these fields existed load as unprotected, without a note.
    protected: bool = False
    note: str = ""

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


REF_SYNTAX = ("{N}@3 (the third), {N}@latest, {N}@-1 (the one before the latest) or {N}@2026-11-30 "
              "(the last of that local day)")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_SEQ = 0xFFFFFFFF  # sequence numbers are 32-bit in catalog keys


def split_ref(ref: str, what: str, placeholder: str) -> tuple[str, str]:
    """``NAME@WHICH`` -> (NAME, WHICH), WHICH one of "N", "latest", "-K", "YYYY-MM-DD".

    Anything else is a usage error (exit 2), with the syntax in the message."""
    name, sep, which = (ref or "").rpartition("@")
    norm = which.lower()
    ok = bool(sep and name)
    if ok and norm != "latest":
        digits = norm[1:] if norm.startswith("-") else norm
        if _DAY.match(norm):
            try:
                datetime.date.fromisoformat(norm)
            except ValueError:
                raise UsageError(f"{ref!r}: {which} is not a date (write YYYY-MM-DD)") from None
        elif not (digits.isascii() and digits.isdigit() and int(digits) > 0):
            ok = False  # isascii: "²" and "٣" pass isdigit() but are no point numbers
        elif int(digits) > MAX_SEQ:  # catalog keys hold 32-bit numbers: no chain is longer
            beyond = "goes back further than" if norm.startswith("-") else "is past"
            raise UsageError(f"{ref!r}: {which} {beyond} the largest point number there can be, {MAX_SEQ}")
    if not ok:
        shown = name if sep else which  # "web01" alone: suggest web01@latest...
        syntax = REF_SYNTAX.format(N=shown if shown and "@" not in shown and " " not in shown else placeholder)
        raise UsageError(f"{ref!r} is not a {what} id; write {syntax}")
    return name, norm


def parse_ref(ref: str) -> tuple[str, str]:
    """'disk@3' -> ('disk', '3'); also 'disk@latest', 'disk@-1', 'disk@2026-11-30'."""
    disk, which = split_ref(ref, "backup", "DISK")
    try:
        return check_disk_name(disk), which
    except BadInputError as e:
        raise UsageError(f"{ref!r} is not a backup id: {e}") from None


@dataclass(frozen=True)
class BadRecord:
    """A catalog entry that does not parse: its key (as ``NAME@N`` when the
    key itself is well formed, else hex) and why."""

    key: str
    reason: str

    def as_dict(self) -> dict:
        return {"key": self.key, "reason": self.reason}


def describe_key(key: bytes) -> str:
    key = bytes(key)
    name, sep, seq = key[:-5], key[-5:-4], key[-4:]
    if name and sep == b"\0" and b"\0" not in name:
        try:
            return f"{name.decode()}@{struct.unpack('>I', seq)[0]}"
        except UnicodeDecodeError:
            pass
    return key.hex()


# Fields every record type must have, with the JSON types they must hold;
# anything else a reader would trip over later (a size that is a string...).
_NUMBER = (int, float)
_FIELD_TYPES = {"seq": int, "time": _NUMBER, "kind": str, "size": int, "chunk_size": int, "stats": dict,
                "metadata": dict, "warnings": list, "disks": list, "config": dict, "source": dict,
                "note": str}


def decode_record(record_type, key, value):
    """The record under ``key``, or IntegrityError saying what is wrong with it."""
    where = describe_key(key)
    try:
        doc = json.loads(bytes(value))
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        rec = record_type(**doc)
        for name, kind in _FIELD_TYPES.items():
            if not hasattr(rec, name):
                continue
            got = getattr(rec, name)
            if not isinstance(got, kind) or isinstance(got, bool):
                raise ValueError(f"field {name!r} is a {type(got).__name__}")
        if not isinstance(getattr(rec, "protected", False), bool):
            raise ValueError(f"field 'protected' is a {type(rec.protected).__name__}")
        if rec.key != bytes(key):
            raise ValueError(f"it describes {rec.id}, not the point its key names")
    except (ValueError, TypeError, AttributeError) as e:
        raise IntegrityError(f"catalog record {where} is damaged: {e}") from None
    return rec


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(t))


class NumberedRecords:
    """Records numbered 1..n per name, JSON in one LMDB database.

    Keys are ``name \\0 seq`` (big-endian), so one name's records are a
    contiguous range in order.  The disk catalog and the VM catalog
    (engine/vsphere/vmcatalog.py) are both this, with their own record type.
    """

    record_type: type = None  # with from_json, key, seq, kind, id
    what = "backup"
    list_option = "--disk"  # how the list command narrows to one name

    def __init__(self, db, name: bytes, next_db=None):
        self.db = db
        self.name = name  # the LMDB database's name
        self.next_db = next_db  # NEXT_SEQ_DB's handle (None: no point was ever deleted here)

    def put(self, txn, record) -> None:
        if not txn.put(record.key, record.to_json(), db=self.db, overwrite=False):
            raise NotFoundError(f"{self.what} {record.id} already exists")  # the chain locks make this a bug

    def write(self, record) -> tuple[bytes, bytes, bytes]:
        """``record`` as a (database, key, value) write for WriteSession.commit's metadata."""
        return self.name, record.key, record.to_json()

    def check_new(self, txn, record) -> None:
        if txn.get(record.key, db=self.db) is not None:
            raise NotFoundError(f"{self.what} {record.id} already exists")  # the chain locks make this a bug

    def get(self, txn, name: str, seq: int):
        key = catalog_key(name, seq)
        value = txn.get(key, db=self.db)
        return decode_record(self.record_type, key, value) if value is not None else None

    def _decoded(self, items, bad: list | None) -> Iterator:
        """Records of (key, value) pairs.  A record that does not parse raises
        IntegrityError naming it, or, given a ``bad`` list, is appended to it
        as a BadRecord and skipped: listings go on past a damaged entry."""
        for key, value in items:
            try:
                yield decode_record(self.record_type, key, value)
            except IntegrityError as e:
                if bad is None:
                    raise
                bad.append(BadRecord(describe_key(key), str(e)))

    def for_name(self, txn, name: str, bad: list | None = None) -> Iterator:
        prefix = name.encode() + b"\0"

        def items():
            with txn.cursor(db=self.db) as cur:
                if not cur.set_range(prefix):
                    return
                for key, value in cur:
                    # Names hold no NUL, so the prefix matches this name only.
                    if not bytes(key).startswith(prefix):
                        break
                    yield key, value
        return self._decoded(items(), bad)

    def all(self, txn, bad: list | None = None) -> Iterator:
        def items():
            with txn.cursor(db=self.db) as cur:
                yield from cur
        return self._decoded(items(), bad)

    def latest(self, txn, name: str, kind: str | None = None):
        found = None
        for rec in self.for_name(txn, name):
            if kind is None or rec.kind == kind:
                found = rec
        return found

    def next_seq(self, txn, name: str) -> int:
        last = self.latest(txn, name)
        return max(last.seq + 1 if last else 1, self.reserved_seq(txn, name))

    def next_key(self, name: str) -> bytes:
        return self.name + b"\0" + name.encode()

    def reserved_seq(self, txn, name: str) -> int:
        """The number after the highest one a deleted point of ``name`` had (1: none)."""
        if self.next_db is None:
            return 1
        value = txn.get(self.next_key(name), db=self.next_db)
        return struct.unpack(">I", bytes(value))[0] if value is not None and len(value) == 4 else 1

    def next_write(self, name: str, seq: int) -> tuple[bytes, bytes, bytes]:
        """The metadata write that keeps numbers below ``seq`` unused in ``name``'s chain."""
        return NEXT_SEQ_DB, self.next_key(name), struct.pack(">I", seq)

    def _resolve(self, txn, name: str, which: str, ref: str, list_hint: str):
        """The record ``which`` (from ``split_ref``) names in ``name``'s chain, or
        NotFoundError listing the newest points and how many older ones exist."""
        if which.isdigit():
            rec = self.get(txn, name, int(which)) if int(which) <= MAX_SEQ else None
            if rec is not None:
                return rec
            chain = list(self.for_name(txn, name))
        else:
            chain = list(self.for_name(txn, name))
            if which == "latest":
                found = chain[-1:]
            elif which.startswith("-"):
                back = int(which[1:])
                found = [chain[-1 - back]] if back < len(chain) else []
            else:
                found = [r for r in chain if _day(r.time) == which][-1:]
            if found:
                return found[0]
        hint = f"{list_hint} {self.list_option} {name}" if chain else list_hint
        raise NotFoundError(f"no {self.what} {ref}; {self._newest(chain, name)} (see '{hint}')")

    def _newest(self, chain: list, name: str, show: int = 5) -> str:
        if not chain:
            return f"there are no {self.what}s of {name!r}"
        n = len(chain)
        newest = ", ".join(f"{r.id} ({time.strftime('%Y-%m-%d %H:%M', time.localtime(r.time))})"
                           for r in reversed(chain[-show:]))
        if n == 1:
            return f"{name} has one {self.what}, {newest}"
        older = f", and {n - show} older" if n > show else ""
        return f"{name} has {n} {self.what}s; the newest: {newest}{older}"


class Catalog(NumberedRecords):
    """Disk backups ``DISK@N``."""

    record_type = BackupRecord

    def for_disk(self, txn, disk: str, bad: list | None = None) -> Iterator[BackupRecord]:
        return self.for_name(txn, disk, bad)

    def resolve(self, txn, ref: str) -> BackupRecord:
        disk, which = parse_ref(ref)
        return self._resolve(txn, disk, which, ref, "blockvault list STORE")
