"""What a write session holds while it runs: its chains' locks, the store
lock (shared) and its registration.

They are taken in that order: the chains first, because that is where a
backup may wait long (another backup of the same disk), then ``STORE/lock``
shared (only a rebuild or a copy, holding it alone, keeps a session out),
then the registration, which names the session to whoever finds one of its
chains busy.  They are given back in the reverse order, the registration
first: a listing that still sees it live is never wrong.  Taking any of them
may fail; whatever was taken by then is given back.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterable

from chunkstore.lock import ChainLock, StoreLock
from chunkstore.registry import Registration, Registry

if TYPE_CHECKING:
    from chunkstore.store import ChunkStore


class Holds:
    def __init__(self, store: "ChunkStore", purpose: str):
        self.store = store
        self.purpose = purpose
        self.chains: list[ChainLock] = []
        self.store_lock = StoreLock(store.path)
        self.registration: Registration | None = None

    def take(self, wait: float, kind: str, chains: Iterable[tuple[str, str]],
             alone: Callable[[], None] | None = None) -> None:
        """Everything, within ``wait`` seconds in all.  ``alone``, if given, runs
        first under the store lock held exclusive (a format upgrade)."""
        try:
            deadline = self.lock_chains(chains, wait)
            if alone is not None:
                self.store_lock.acquire(wait, f"{self.purpose} (alone)", deadline=deadline)
                alone()
                self.store_lock.release()
            self.store_lock.acquire(wait, self.purpose, shared=True, deadline=deadline)
            self.registration = Registry(self.store).register(kind, self.purpose)
            for chain in self.chains:
                chain.name_session(self.registration.id, self.purpose)
        except BaseException:
            self.release()
            raise

    def lock_chains(self, chains: Iterable[tuple[str, str]], wait: float) -> float:
        """Take the locks of backup chains, (kind, name) with kind "disk" or
        "vm": a second backup of one of them waits up to ``wait`` seconds or
        fails (exit 4) naming this session.  Taken in (kind, name) order, so
        two sessions cannot deadlock over them; a session may add chains once
        it knows them (a VM's disks).  Returns the deadline it waited to."""
        wait = max(wait, 0.0)
        deadline = time.monotonic() + wait
        for kind, name in sorted(set(chains)):
            if any((c.kind, c.name) == (kind, name) for c in self.chains):
                continue
            chain = ChainLock(self.store.path, kind, name)
            chain.acquire(wait, deadline, self.purpose)
            self.chains.append(chain)
            if self.registration is not None:
                chain.name_session(self.registration.id, self.purpose)
        return deadline

    def release(self) -> None:
        if self.registration is not None:
            self.registration.close()
            self.registration = None
        self.store_lock.release()
        for chain in reversed(self.chains):
            chain.release()
        self.chains.clear()
