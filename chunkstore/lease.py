"""One owner host per S3 store, provably: a lease object in the bucket.

A local store has one owner by construction (its directory is on one machine); a bucket
can be reached from anywhere, and two hosts writing one store would each commit an
index the other does not know.  So the host that works on the store holds the object
``PREFIX/lease``, made with ``If-None-Match: *`` and renewed with ``If-Match: <ETag>``:
both are atomic on the endpoint (chunkstore/s3check.py proves it at init and attach), so
of two hosts racing for it exactly one wins, and a host that was taken over notices at
its next renewal or check.

The lease belongs to a *host* (the cache directory's ``host_id``), not a process: the
processes of one host share it (concurrent backups on the owner host stay possible, the
local session registry orders them), and whichever renews it simply swaps the ETag.  A
lease that nobody renewed for ``ttl`` seconds has expired; another host may then take it
over, but only when asked to (``attach --take-over``): expiry alone proves nothing about
whether the old host is really gone.

Its age is measured against both the holder's own ``renewed`` time and the endpoint's
Last-Modified, whichever is later, so a holder whose clock runs behind (or a taker whose
clock runs ahead) cannot make a live lease look expired.

Body (docs/FORMAT.md "Object storage"): one line of UTF-8 JSON, keys in this order,
``{"holder":"web01 4242","host_id":"<32 hex>","renewed":1764620000.25,"ttl":300.0}\\n``.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from chunkstore.errors import LeaseHeld, LeaseLost, ObjectMissing, S3Error

log = logging.getLogger("blockvault.lease")

LEASE_TTL = 300.0
LEASE_KEY = "lease"
_ATTEMPTS = 8        # CAS rounds lost to this host's own other processes before giving up


def encode(holder: str, host_id: str, renewed: float, ttl: float) -> bytes:
    doc = {"holder": holder, "host_id": host_id, "renewed": round(renewed, 3), "ttl": float(ttl)}
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def decode(data: bytes, last_modified: float) -> dict:
    """The lease document; an unreadable one counts as held by an unknown host since its
    Last-Modified (it is never silently overwritten, only taken over after expiry)."""
    try:
        doc = json.loads(data)
        if not (isinstance(doc, dict) and isinstance(doc.get("host_id"), str)
                and isinstance(doc.get("renewed"), (int, float)) and isinstance(doc.get("ttl"), (int, float))):
            raise ValueError
        doc.setdefault("holder", "?")
        return doc
    except ValueError:
        return {"holder": "an unreadable lease object", "host_id": "", "renewed": last_modified, "ttl": LEASE_TTL}


def _age(doc: dict, last_modified: float, now: float) -> float:
    return now - max(float(doc["renewed"]), last_modified)


class Lease:
    """This host's hold on the store.  ``start_renewing`` keeps it while a command runs;
    ``check`` before every commit proves it is still ours."""

    def __init__(self, bucket, host_id: str, holder: str, ttl: float, etag: str, renewed: float):
        self.bucket = bucket
        self.host_id = host_id
        self.holder = holder
        self.ttl = ttl
        self.etag = etag
        self.renewed = renewed           # our clock, at our last successful write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LeaseLost | None = None
        self.show = lambda h: h          # how messages name a holder (acquire's ``show``)

    def __repr__(self) -> str:
        return f"Lease({self.bucket.url!r}, holder={self.show(self.holder)!r}, host_id={self.host_id!r})"

    @classmethod
    def acquire(cls, bucket, host_id: str, holder: str, take_over: bool = False, ttl: float = LEASE_TTL,
                show=None) -> "Lease":
        """Take (or renew) the lease for ``host_id``; LeaseHeld when another host holds it,
        unless ``take_over`` and it has expired.  ``show(holder)``: the holder as messages name
        it (an encrypted store's is sealed: chunkstore/s3store.py S3Context.holder_text)."""
        show = show or (lambda h: h)
        for _ in range(_ATTEMPTS):
            now = time.time()
            try:
                data, info = bucket.get_with_info(LEASE_KEY, hidden=False)
            except ObjectMissing:
                etag = bucket.put_new_etag(LEASE_KEY, encode(holder, host_id, now, ttl))
                if etag is not None:
                    log.info("lease of %s taken by %s", bucket.url, show(holder))
                    lease = cls(bucket, host_id, holder, ttl, etag, now)
                    lease.show = show
                    return lease
                continue                                    # someone made it first: look again
            doc = decode(data, info.last_modified)
            doc["holder"] = show(doc["holder"])
            age = _age(doc, info.last_modified, now)
            if doc["host_id"] != host_id:
                expired = age > float(doc["ttl"])
                if not (take_over and expired):
                    raise _held(bucket, doc, age, expired)
                log.warning("taking over the lease of %s from %s (not renewed for %.0f s)", bucket.url,
                            doc["holder"], age)
            etag = bucket.put_if_match_etag(LEASE_KEY, encode(holder, host_id, now, ttl), info.etag)
            if etag is not None:
                lease = cls(bucket, host_id, holder, ttl, etag, now)
                lease.show = show
                return lease
        raise S3Error(f"the lease of {bucket.url} changed under every one of {_ATTEMPTS} attempts to take it; "
                      "run the command again")

    def renew(self) -> None:
        """Write a fresh ``renewed`` time with compare-and-swap; LeaseLost if another host holds it."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            etag = self.etag
            for _ in range(_ATTEMPTS):
                now = time.time()
                new = self.bucket.put_if_match_etag(LEASE_KEY, encode(self.holder, self.host_id, now, self.ttl), etag)
                if new is not None:
                    self.etag, self.renewed = new, now
                    return
                # changed since we wrote it: another process of this host renewed it, or another host took it
                doc, info = self._read()
                if doc is None or doc["host_id"] != self.host_id:
                    raise self._lose(doc, info)
                etag = info.etag
            raise S3Error(f"the lease of {self.bucket.url} changed under every one of {_ATTEMPTS} renewals; "
                          "run the command again")

    def check(self) -> None:
        """Raise LeaseLost unless the lease is still this host's (one GET); renews first when
        the background renewal has fallen behind, so an expired lease is never trusted."""
        if self._lost is not None:
            raise self._lost
        if time.time() - self.renewed > self.ttl / 2:
            self.renew()
            return
        doc, info = self._read()
        if doc is None or doc["host_id"] != self.host_id:
            raise self._lose(doc, info)

    def _read(self):
        try:
            data, info = self.bucket.get_with_info(LEASE_KEY, hidden=False)
        except ObjectMissing:
            return None, None
        return decode(data, info.last_modified), info

    def _lose(self, doc, info) -> LeaseLost:
        if doc is None:
            why = "the lease object was deleted"
        else:
            why = f"{self.show(doc['holder'])} (host id {doc['host_id'] or '?'}) took it over"
        self._lost = LeaseLost(f"this host lost the lease of {self.bucket.url}: {why}; nothing more is committed "
                               f"here. The store now belongs to that host; to work here again, run attach "
                               f"--take-over once its lease has expired")
        return self._lost

    # --- the background renewal -------------------------------------------------------------

    def start_renewing(self) -> None:
        """Renew every ttl/4 in a daemon thread until stop(); a failure to reach the endpoint
        is retried at the next tick (check() fails once the lease is half-way to expiry)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except S3Error as exc:
                log.warning("lease renewal of %s failed (will retry): %s", self.bucket.url, exc)

    def stop(self) -> None:
        """Stop renewing (the lease stays, and expires ttl after its last renewal)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _held(bucket, doc: dict, age: float, expired: bool) -> LeaseHeld:
    ttl = float(doc["ttl"])
    if expired:
        advice = (f"it expired {age - ttl:.0f} s ago: if that host is gone for good, run attach --take-over "
                  "(a host that still works on the store would then lose it)")
    else:
        advice = (f"it expires {ttl - age:.0f} s after that host stops renewing it; wait for that host to "
                  "finish, or attach --take-over once it has expired")
    return LeaseHeld(f"store {bucket.url} is held by {doc['holder']} (host id {doc['host_id'] or '?'}), lease "
                     f"renewed {max(age, 0.0):.0f} s ago (ttl {ttl:.0f} s): {advice}",
                     holder=str(doc["holder"]), age=age, host_id=doc["host_id"])
