"""Where key slots are kept: ``STORE/keys/`` beside config.json, or ``PREFIX/keys/``
in a store's bucket with a copy in this host's cache (``CACHE/keys/``).

Each slot is one file written once (a temporary name, fsync, rename; in the
bucket ``If-None-Match: *``) and removed by unlinking it: no slot file is
ever rewritten, so a crash leaves every slot either whole or absent.  The
crash-safe order of a passphrase change follows from it: the new slot is
written (and durable) before the old one goes, so there is no instant when
neither opens the store.

In a bucket, the bucket is the truth and the cache a copy: a slot is
written to the bucket first, then to the cache; removed from the bucket
first, then from the cache.  ``attach`` replaces the cache's copies with
the bucket's.  Reading uses the cache's copies (no request per unlock).
"""

from __future__ import annotations

import os

from chunkstore import safefs
from chunkstore.config import fsync_dir
from chunkstore.errors import IntegrityError, StoreError
from chunkstore.keyslots import KEYS_DIR, Slot, slot_file


class LocalSlots:
    """The slot files of a directory (a local store, or an S3 store's cache)."""

    def __init__(self, store_path: str):
        self.store_path = store_path
        self.dir = os.path.join(store_path, KEYS_DIR)

    def ids(self) -> list[str]:
        if not os.path.lexists(self.dir):
            return []
        safefs.check_dir(self.dir, "key slot directory")   # never a link to somewhere else
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def read_raw(self, slot_id: str) -> bytes:
        path = os.path.join(self.dir, slot_file(slot_id))
        with os.fdopen(safefs.open_file(path, os.O_RDONLY, "key slot"), "rb") as f:
            return f.read()

    def load(self) -> tuple[list[Slot], list[str]]:
        """The slots that parse, and a message per damaged one."""
        slots, damaged = [], []
        for slot_id in self.ids():
            where = os.path.join(self.dir, slot_file(slot_id))
            try:
                slot = Slot.parse(self.read_raw(slot_id), where)
                if slot.slot_id != slot_id:
                    raise IntegrityError(f"key slot {where} names slot {slot.slot_id}: renamed or damaged")
                slots.append(slot)
            except (IntegrityError, OSError) as e:
                damaged.append(str(e))
        return slots, damaged

    def write(self, slot: Slot) -> None:
        _write_once(self.dir, slot_file(slot.slot_id), slot.to_bytes())

    def remove(self, slot_id: str) -> None:
        os.unlink(os.path.join(self.dir, slot_file(slot_id)))
        fsync_dir(self.dir)

    def replace_all(self, bodies: dict[str, bytes]) -> None:
        """The cache's copies made the bucket's (attach): written, then the others removed."""
        if not bodies and not os.path.lexists(self.dir):
            return
        have = set(self.ids())
        for slot_id, body in bodies.items():
            if slot_id in have and self.read_raw(slot_id) == body:
                continue
            if slot_id in have:
                os.unlink(os.path.join(self.dir, slot_file(slot_id)))
            _write_once(self.dir, slot_file(slot_id), body)
        for slot_id in have - set(bodies):
            self.remove(slot_id)


class BucketSlots(LocalSlots):
    """The slots of a store in a bucket: ``PREFIX/keys/<id>.json``, read through the cache's copies."""

    def __init__(self, cache: str, bucket):
        super().__init__(cache)
        self.bucket = bucket

    def write(self, slot: Slot) -> None:
        body = slot.to_bytes()
        key = f"{KEYS_DIR}/{slot_file(slot.slot_id)}"
        if not self.bucket.put_new(key, body) and self.bucket.get(key) != body:
            raise StoreError(f"{self.bucket.url}: key slot {key} exists already (slot ids are random: "
                             "run the command again)")
        super().write(slot)

    def remove(self, slot_id: str) -> None:
        key = f"{KEYS_DIR}/{slot_file(slot_id)}"
        failures = self.bucket.delete([key])
        if failures:
            raise StoreError(f"{self.bucket.url}: key slot {key} could not be removed: {failures[0][1]}")
        try:
            super().remove(slot_id)
        except FileNotFoundError:
            pass

    def fetch(self) -> dict[str, bytes]:
        """The bucket's slot files by slot id (attach reads them before it makes the cache)."""
        bodies = {}
        for info in self.bucket.list(f"{KEYS_DIR}/"):
            name = info.key[len(KEYS_DIR) + 1:]
            if "/" in name or not name.endswith(".json"):
                continue
            bodies[name[:-5]] = self.bucket.get(info.key)
        return bodies


class MemorySlots:
    """Slot files already read (attach's, from the bucket), for KeySource.unlock."""

    def __init__(self, bodies: dict[str, bytes], where: str):
        self.bodies, self.where = bodies, where

    def load(self) -> tuple[list[Slot], list[str]]:
        slots, damaged = [], []
        for slot_id, body in sorted(self.bodies.items()):
            try:
                slot = Slot.parse(body, f"{self.where}/{KEYS_DIR}/{slot_file(slot_id)}")
                slots.append(slot) if slot.slot_id == slot_id else damaged.append(f"slot {slot_id} renamed")
            except IntegrityError as e:
                damaged.append(str(e))
        return slots, damaged


def _write_once(directory: str, name: str, body: bytes) -> None:
    safefs.make_dir(directory, "key slot directory")
    final = os.path.join(directory, name)
    if os.path.lexists(final):
        raise StoreError(f"key slot {final} exists already (a slot is written once)")
    safefs.write_durably(final, body, "key slot")


def slots_of(store) -> LocalSlots:
    """The slot place of an open ChunkStore (local, or in a bucket)."""
    s3 = getattr(store, "s3", None)
    return BucketSlots(s3.cache, s3.bucket) if s3 is not None else LocalSlots(store.path)
