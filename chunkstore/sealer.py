"""The thread that writes trailers and fsyncs a write session's retired packs.

Sealing overlaps the flush of a full pack with the reading and compressing
of the rest of the disk (chunkstore/session.py); packs are sealed in the
order they were retired, and the session is told of each, or of the first
failure (which it reports to its writers and to its commit).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chunkstore.pack import PackWriter
    from chunkstore.session import WriteSession


class Sealer:
    """One session's sealing thread."""

    def __init__(self, session: WriteSession):
        self.session = session
        self.todo: "queue.SimpleQueue[PackWriter | None]" = queue.SimpleQueue()
        self._discard = False
        self.thread = threading.Thread(target=self._run, name="bv-pack-sync", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            pack = self.todo.get()
            if pack is None:
                return
            if self._discard:
                continue
            try:
                pack.seal()
                pack.sync()
                pack.close()
                self.session.store.backend.publish(pack.pack_id, pack.path)  # an upload starts (S3)
                pack.synced = True   # after publish: a checkpoint waits for the upload of every synced pack
                self.session._sealed(pack)
            except BaseException as e:  # reported to writers and to commit
                self.session._sealer_failed(e)
                self._discard = True

    def stop(self, discard: bool = False) -> None:
        """Finish (or, with ``discard``, skip) what is queued, then end."""
        if discard:
            self._discard = True
        self.todo.put(None)
        self.thread.join()
