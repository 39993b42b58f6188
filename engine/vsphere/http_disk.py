"""A disk read (and a disk file written) through the datastore's HTTP file access.

vSphere serves every datastore file at ``/folder/<path>?dcPath=..&dsName=..``
to a client holding a session cookie, with HTTP ranges for reads and PUT for
whole-file uploads.  That is the transport used where there is no VDDK: the
tests' vCenter simulator, and any vSphere where installing VDDK is not an
option.  It reads a FlatVer2 disk's ``-flat.vmdk`` as the raw image it is;
while the backup snapshot exists that file is the frozen base disk (the VM
writes into the snapshot's redo log), so what is read is the snapshot's
instant.  Disks with a parent chain (the VM had other snapshots) are not flat
files; ``open_disk`` refuses them and points at VDDK.  A flat file stored
shorter than its disk reads as zeros past its end (``served_length``), and
``HttpDisk.file_length`` tells the run to warn about it.

``HttpDisk`` has the shape the chunk pipeline wants from any source (``size``,
``extents()``, ``read_chunks()``, ``close()``).  Reads of consecutive chunks
become one ranged GET (the pipeline's batches are ~2 MiB, and a store's
default 256 KiB chunks keep even scattered reads at ≥ 256 KiB), and a small pool
of keep-alive HTTPS connections lets the pipeline's threads read in parallel:
socket I/O releases the GIL.  A request that fails on the network is retried
once on a fresh connection; a 401 (session expired) once after a new login.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import threading
from typing import Callable, Iterator

from engine.credentials import redact
from engine.vsphere.connection import Connection
from engine.vsphere.errors import NETWORK_ERRORS, ConnectionLost, VsphereError, describe_fault

MAX_REQUEST = 16 << 20     # bytes per ranged GET
UPLOAD_BLOCK = 1 << 20     # bytes per socket write of an upload
DEFAULT_CONNECTIONS = 4
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Unauthorized(Exception):
    pass


def served_length(status: int, content_range: str, offset: int, n: int,
                  capacity: int | None) -> tuple[int, int | None]:
    """How many of the ``n`` bytes asked for at ``offset`` a 206 or 416 answer
    carries, and the file's length as stated (None: ``*``).

    A thin disk's ``-flat.vmdk`` may be stored shorter than the disk (govmomi's
    simulator does so; some datastores may too): then the server cuts the range
    at the end of the file (206, ``bytes A-END/TOTAL``) or refuses a range wholly
    past it (416, ``bytes */TOTAL``).  That is accepted only when TOTAL is stated,
    is exactly where the bytes stop, and is below the disk's ``capacity``: the
    bytes past the file's end are then zeros, as the raw reader reads past the
    end of an image.  Anything else (a file longer than the disk, a short body
    with no stated length, another range) raises ValueError with the reason.
    """
    asked = f"asked for bytes {offset}-{offset + n - 1}"
    m = _CONTENT_RANGE.fullmatch(content_range or "")
    total = int(m.group(3)) if m and m.group(3) != "*" else None
    if status == 416:
        m416 = re.fullmatch(r"bytes \*/(\d+)", content_range or "")
        total = int(m416.group(1)) if m416 else None
        if total is not None and capacity is not None and total <= offset and total < capacity:
            return 0, total
        raise ValueError(f"{asked}, the server refused the range (HTTP 416, Content-Range {content_range!r})"
                         + _versus(total, capacity))
    if not m or int(m.group(1)) != offset:
        raise ValueError(f"{asked}, the server sent {content_range!r}")
    end = int(m.group(2))
    if total is not None and capacity is not None and total > capacity:
        raise ValueError(f"{asked}, the server sent {content_range!r}: the file is {total} bytes, longer than "
                         f"the disk's capacity of {capacity} bytes")
    if end == offset + n - 1:
        return n, total
    if offset <= end < offset + n - 1 and total == end + 1 and capacity is not None:
        return end + 1 - offset, total
    raise ValueError(f"{asked}, the server sent {content_range!r}" + _versus(total, capacity))


def _versus(total: int | None, capacity: int | None) -> str:
    if total is None:
        return " without stating the file's length"
    if capacity is not None and total >= capacity:
        return f" for a file of {total} bytes, which is not shorter than the disk's {capacity}"
    return ""


class DatastoreHttp:
    """Keep-alive HTTPS connections to one vCenter's datastore file access."""

    def __init__(self, conn: Connection, connections: int = DEFAULT_CONNECTIONS):
        self.conn = conn
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, connections))
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.requests = 0

    def _connect(self, blocksize: int = 8192) -> http.client.HTTPSConnection:
        ep = self.conn.endpoint
        c = http.client.HTTPSConnection(ep.host, ep.port, timeout=self.conn.timeout,
                                        context=self.conn.tls.context(), blocksize=blocksize)
        c.connect()
        self.conn.tls.check(c.sock.getpeercert(binary_form=True), f"vCenter {ep} (datastore access)")
        return c

    @contextlib.contextmanager
    def _borrow(self) -> Iterator[http.client.HTTPSConnection]:
        with self._slots:
            try:
                c = self._idle.get_nowait()
            except queue.Empty:
                c = self._connect()
            try:
                yield c
            except BaseException:
                c.close()  # its state is unknown: never reuse it
                raise
            self._idle.put(c)

    def read_into(self, url: str, offset: int, view: memoryview, label: str,
                  capacity: int | None = None) -> tuple[int, int | None]:
        """Fill ``view`` with the file's bytes at ``offset`` (one ranged GET).

        Returns how many bytes the file had there and the file's length as
        the server stated it: fewer bytes than ``len(view)`` only when that
        length is below ``capacity`` (the disk's size, see served_length);
        the rest of ``view`` is then the caller's to fill.
        """
        for attempt in (1, 2):
            try:
                with self._borrow() as c:
                    return self._get(c, url, offset, view, label, capacity)
            except _Unauthorized:
                if attempt == 2:
                    raise VsphereError(f"datastore access to {label} on vCenter {self.conn.endpoint} was refused "
                                       "(401) even after a new login") from None
                self.conn.refresh()
            except NETWORK_ERRORS as e:
                if attempt == 2:
                    raise ConnectionLost(f"lost the connection to vCenter {self.conn.endpoint} while reading "
                                         f"{label} at offset {offset}: {describe_fault(e)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, c, url: str, offset: int, view: memoryview, label: str,
             capacity: int | None) -> tuple[int, int | None]:
        n = len(view)
        c.request("GET", url, headers={"Range": f"bytes={offset}-{offset + n - 1}", "Cookie": self.conn.cookie})
        resp = c.getresponse()
        if resp.status == 401:
            resp.read()
            raise _Unauthorized()
        length = None
        if resp.status in (206, 416):
            try:
                n, length = served_length(resp.status, resp.getheader("Content-Range", ""), offset, len(view), capacity)
            except ValueError as e:
                resp.read()
                raise VsphereError(f"reading {label}: {e}") from None
        elif not (resp.status == 200 and offset == 0 and resp.length == n):
            detail = redact(resp.read(300).decode("utf-8", "replace").strip())
            raise VsphereError(f"reading {label} at offset {offset}: HTTP {resp.status} {resp.reason}"
                               + (f" ({detail})" if detail else ""))
        got = 0
        while got < n:
            k = resp.readinto(view[got:n])
            if not k:
                raise http.client.IncompleteRead(bytes(), n - got)
            got += k
        resp.read()  # the (empty) rest, so the connection can be reused
        with self._lock:
            self.bytes_received += n
            self.requests += 1
        return n, length

    def upload(self, url: str, path: str, label: str, on_progress: Callable[[int], None] | None = None) -> int:
        """PUT the whole of local file ``path`` to ``url``, streamed; returns its size."""
        size = os.path.getsize(path)
        for attempt in (1, 2):
            try:
                c = self._connect(blocksize=UPLOAD_BLOCK)
                try:
                    with open(path, "rb") as f:
                        c.request("PUT", url, body=_Reader(f, on_progress if attempt == 1 else None),
                                  headers={"Content-Length": str(size), "Content-Type": "application/octet-stream",
                                           "Cookie": self.conn.cookie})
                    resp = c.getresponse()
                    detail = redact(resp.read(300).decode("utf-8", "replace").strip())
                finally:
                    c.close()
            except NETWORK_ERRORS as e:
                if attempt == 2:
                    raise ConnectionLost(f"lost the connection to vCenter {self.conn.endpoint} while uploading "
                                         f"{label}: {describe_fault(e)}") from None
                continue
            if resp.status == 401 and attempt == 1:
                self.conn.refresh()
                continue
            if resp.status not in (200, 201, 204):
                raise VsphereError(f"uploading {label}: HTTP {resp.status} {resp.reason}"
                                   + (f" ({detail})" if detail else ""))
            return size
        raise VsphereError(f"uploading {label}: the session was refused twice")  # pragma: no cover

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


class _Reader:
    """A file for http.client's streaming body that reports progress."""

    def __init__(self, f, on_progress):
        self.f = f
        self.on_progress = on_progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data and self.on_progress:
            self.on_progress(len(data))
        return data


class HttpDisk:
    """One disk of the backup snapshot, read over datastore HTTP access."""

    transport = "http"
    kind = "vsphere-http"

    def __init__(self, http: DatastoreHttp, url: str, size: int, allocated: Callable[[], list[tuple[int, int]]],
                 label: str):
        self.http = http
        self.url = url
        self.size = size
        self.path = label
        self._allocated = allocated
        self.closed = False
        # Set when the flat file turned out shorter than the disk: its length.
        self.file_length: int | None = None
        self._short_lock = threading.Lock()

    def extents(self) -> list[tuple[int, int]]:
        """Allocated areas: QueryChangedDiskAreas(changeId "*") of the snapshot."""
        return self._allocated()

    def read_chunks(self, offsets, chunk_size: int, buffer) -> None:
        """Chunk k of ``buffer`` gets the disk's bytes at ``offsets[k]``; zeros past the end."""
        view = memoryview(buffer).cast("B")
        offsets = list(offsets)
        if len(view) < len(offsets) * chunk_size:
            raise ValueError(f"buffer of {len(view)} bytes is too small for {len(offsets)} chunks")
        per_request = max(1, MAX_REQUEST // chunk_size)
        i = 0
        while i < len(offsets):
            j = i + 1
            while (j < len(offsets) and j - i < per_request
                   and offsets[j] == offsets[j - 1] + chunk_size):
                j += 1
            self._read_span(offsets[i], view[i * chunk_size:j * chunk_size])
            i = j

    def _read_span(self, offset: int, slot: memoryview) -> None:
        inside = max(0, min(len(slot), self.size - offset))
        if inside:
            got, length = self.http.read_into(self.url, offset, slot[:inside], self.path, capacity=self.size)
            if got < inside:  # the flat file ends before the disk does: see served_length
                with self._short_lock:
                    self.file_length = length if self.file_length is None else min(self.file_length, length)
                inside = got
        if inside < len(slot):
            slot[inside:] = bytes(len(slot) - inside)

    @property
    def bytes_transferred(self) -> int:
        return self.http.bytes_received

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.http.close()

    def __enter__(self) -> "HttpDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
