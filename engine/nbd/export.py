"""nbdkit Python plugin callbacks (API version 2): one backup point, read-only.

Loaded inside nbdkit by plugin_shim.py; ``import nbdkit`` works only there.
Parameters (``key=value`` after the plugin name, set by engine/nbd/server.py):

    store=PATH    the store
    point=ID      the backup point (db01@3, db01@latest, ...)
    cache=BYTES   the decoded-chunk cache (default 64 MiB)
    stats=PATH    write the PointView's counters there as JSON at exit
    threads=parallel  THREAD_MODEL_PARALLEL (default: SERIALIZE_REQUESTS)

Every connection reads the one PointView opened in ``get_ready``; the view
is thread-safe (its caches are locked; pread, zstd and the digest check
release the GIL), and connections are served in parallel.  Requests *within*
one connection are serialised by default: with THREAD_MODEL_PARALLEL,
Debian's nbdkit 1.32.5 aborts (``raw_send_socket: Assertion `sock >= 0'
failed``) when a client disconnects while replies are in flight, e.g. a
killed qemu-img or an nbdcopy that got EIO, which would take the export
away from every other client.  nbdcopy reads over several connections
(multi-conn), so it loses nothing measurable here (bench/serve.py);
``threads=parallel`` (``serve --parallel-requests``) is for a newer nbdkit.
The plugin has no ``pwrite``: nbdkit
then refuses writes itself, and ``--writable`` is nbdkit's cow filter in
front, whose overlay takes every write.  Nothing a client sends can reach
the store.
"""

from __future__ import annotations

import errno
import json
import os

import nbdkit

_params: dict[str, str] = {}
_state: dict = {}
# What one extents call may cost at most: chunks whose segment must be looked
# at one by one.  A client asking about a whole disk gets the first part and
# asks again from where the answer ends (the protocol allows a short reply).
MAX_EXTENT_CHUNKS = 16 * 1024


def config(key: str, value: str) -> None:
    if key not in ("store", "point", "cache", "stats", "threads", "s3cache"):
        raise RuntimeError(f"unknown parameter {key!r} (store=, point=, cache=, stats=, threads=, s3cache=)")
    _params[key] = value


def config_complete() -> None:
    missing = [k for k in ("store", "point") if k not in _params]
    if missing:
        raise RuntimeError(f"missing parameter(s): {', '.join(k + '=' for k in missing)}")


def thread_model():
    if _params.get("threads") == "parallel":
        return nbdkit.THREAD_MODEL_PARALLEL
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def get_ready() -> None:
    """Open the store and the point once, before the first client connects."""
    from engine.pointview import DEFAULT_CACHE_BYTES, PointView, reader_registration
    from engine.repository import Repository

    repo = Repository.open(_params["store"], **_where())
    registration = reader_registration(repo, "serve", f"serve {_params['point']}")
    registration.__enter__()
    view = PointView.open(repo, _params["point"], cache_bytes=int(_params.get("cache", DEFAULT_CACHE_BYTES)))
    _state.update(repo=repo, view=view, registration=registration)
    nbdkit.debug(f"blockvault: serving {view.record.id}: {view.size} bytes in {view.chunk_size}-byte chunks")


def _where() -> dict:
    """A store in a bucket: its cache (s3cache=) and the settings blockvault serve/mount
    put in the environment (BLOCKVAULT_S3_*: the secret never on nbdkit's command line)."""
    from chunkstore.s3settings import S3Settings, is_store_url
    where = _key()
    if not is_store_url(_params["store"]):
        return where
    return {"cache": _params.get("s3cache"), "s3_settings": S3Settings.resolve(), **where}


def _key() -> dict:
    """An encrypted store's master key, from the file serve/mount handed over (engine/nbd/server.py
    key_handoff): read, then unlinked at once, so it lives on disk only until the store is open."""
    path = os.environ.pop("BLOCKVAULT_NBDKIT_KEY_FILE", None)
    if not path:
        return {}
    from chunkstore.keyexport import read_key_file
    try:
        material = read_key_file(path, "key hand-off file")
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return {"master": material.master}


def cleanup() -> None:
    view = _state.get("view")
    if view is not None and "stats" in _params:
        path = _params["stats"]
        tmp = f"{path}.tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(view.counters.as_dict(), f)
        os.replace(tmp, path)
    registration = _state.pop("registration", None)
    if registration is not None:
        registration.__exit__(None, None, None)
    repo = _state.pop("repo", None)
    if repo is not None:
        repo.close()


def open_connection(readonly: bool):
    return _state["view"]


def get_size(view) -> int:
    return view.size


def block_size(view):
    """Preferred = the chunk size: nbdcopy then asks for whole chunks (one
    decode each) instead of quarters of them."""
    return (1, view.chunk_size, 0xFFFFFFFF)


def can_multi_conn(view) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_extents(view) -> bool:
    return True


def is_rotational(view) -> bool:
    return False


def can_cache(view):
    return nbdkit.CACHE_NONE


def pread(view, buf, offset: int, flags: int) -> None:
    try:
        n = view.pread_into(buf, offset)
    except Exception as e:
        # Damage is the store's (verify reports it); the client sees EIO.
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"blockvault: read of {len(buf)} bytes at {offset} failed: {e}; the client gets EIO; "
                           f"run 'blockvault verify {_params['store']}'") from None
    if n != len(buf):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"blockvault: read past the end of the disk ({offset}+{len(buf)} > {view.size})")


def extents(view, count: int, offset: int, flags: int):
    """Zero chunks as hole|zero, data chunks as 0, merged into runs."""
    limit = MAX_EXTENT_CHUNKS * view.chunk_size
    try:
        runs = view.extents(offset, min(count, limit))
    except Exception as e:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"blockvault: extents at {offset}: {e}") from None
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    out = [(off, length, hole if zero else 0) for off, length, zero in runs]
    if flags & nbdkit.FLAG_REQ_ONE:
        return out[:1]
    return out
