"""``serve``, ``mount``, ``umount``: a backup point used in place, without restoring it.

``serve`` runs nbdkit with blockvault's plugin (engine/nbd/) until stopped;
``mount`` puts the same export behind nbdfuse as ``DIR/disk.raw`` and
returns; ``umount`` takes it down.  The point is resolved and its manifest
checked here, before any server starts, so an unknown or damaged point is
an ordinary error, not an nbdkit log line.
"""

from __future__ import annotations

import faulthandler
import ipaddress
import logging
import os
import shutil
import signal
import stat
import tempfile

from engine import argtypes, clilog
from engine.cli.common import count, open_repo, add_store_arg, s3_settings
from engine.commandline import EXIT_OK, add_command, emit
from engine.errors import ServeError, UsageError
from engine.progress import human_bytes

log = logging.getLogger("blockvault.serve")
DEFAULT_CACHE = "64M"


def _resolve(args):
    """The point's catalog record and manifest, checked; the store is closed again
    (nbdkit's plugin opens it itself)."""
    from engine.pointview import PointView
    with open_repo(args) as repo:
        view = PointView.open(repo, args.backup)
        return view.record, view.manifest


def _endpoint(args, tmpdir: str):
    from engine.nbd import server as srv
    if args.socket and (args.port or args.listen):
        raise UsageError("give either --socket or --port/--listen, not both")
    if args.port or args.listen:
        addr = args.listen or "127.0.0.1"
        try:
            loopback = ipaddress.ip_address(addr).is_loopback
        except ValueError:
            raise UsageError(f"--listen {addr}: give an IP address (127.0.0.1, 0.0.0.0, ::)") from None
        port = args.port or srv.DEFAULT_PORT
        srv.check_port(addr, port)
        if not loopback:
            log.warning(f"WARNING: --listen {addr}: the export is open to the NETWORK on port {port}, without "
                        "authentication or encryption: anyone who can reach it can read this disk"
                        + (" and write to its overlay" if args.writable else ""))
        return srv.Endpoint(addr=addr, port=port)
    if args.socket:
        srv.prepare_socket(args.socket)
        return srv.Endpoint(socket=os.path.abspath(args.socket))
    path = os.path.join(tmpdir, "nbd.sock")
    srv.prepare_socket(path)  # a TMPDIR too long for a socket is said here
    return srv.Endpoint(socket=path)


def _serve_doc(record, endpoint, writable: bool, pid: int) -> dict:
    return {"id": record.id, "size": record.size, "chunk_size": record.chunk_size, "uri": endpoint.uri,
            "socket": endpoint.socket, "address": endpoint.addr, "port": endpoint.port,
            "writable": writable, "pid": pid}


def _stats_line(stats: dict) -> str:
    if not stats:
        return "no statistics (nbdkit did not exit cleanly)"
    return (f"{count(stats.get('requests', 0), 'read request')}, {count(stats.get('chunks_read', 0), 'chunk')} "
            f"read ({human_bytes(stats.get('bytes_read', 0))} from packs), "
            f"{count(stats.get('cache_hits', 0), 'cache hit')}, {count(stats.get('zero_chunks', 0), 'zero chunk')}"
            + (f"; {stats['read_errors']} READ ERROR(S): the clients got EIO, run 'blockvault verify'"
               if stats.get("read_errors") else ""))


def _how_to_stop() -> str:
    """The signals that really stop this server.  One started from a script with
    ``&`` inherits SIGINT ignored and keeps it so (engine/signals.py): saying
    "Ctrl-C" then would leave whoever sends SIGINT waiting for ever."""
    from engine import signals
    stops = ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"))
    off = [sig for sig, _ in stops if sig in signals.ignored()]
    ways = [name for sig, name in stops if sig not in off]
    hint = "stop with " + " or ".join(ways) if ways else "only SIGKILL stops it"
    if off:
        hint += (f" ({' and '.join(map(signals.signal_name, off))} {'is' if len(off) == 1 else 'are'} ignored: "
                 "ignored when blockvault started, as for a command a script starts with '&')")
    return hint


def cmd_serve(args) -> int:
    from engine.nbd import server as srv
    # `kill -USR1 PID` prints where every thread of this process is (a server that
    # does not stop says why); the process goes on serving.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    record, _ = _resolve(args)
    srv.check_nbdkit()
    srv.reap_stale_tempdirs()
    tmpdir = tempfile.mkdtemp(prefix=srv.TEMP_PREFIX)
    server = None
    try:
        endpoint = _endpoint(args, tmpdir)
        pidfile, stats = os.path.join(tmpdir, "nbdkit.pid"), os.path.join(tmpdir, "stats.json")
        settings = s3_settings(args)
        argv = srv.nbdkit_argv(args.store, record.id, endpoint, args.writable, args.cache, stats, pidfile,
                               args.run, verbose=args.verbose >= 2, parallel_requests=args.parallel_requests,
                               s3_cache=args.s3_cache if settings else None)
        mode = "writable through a copy-on-write overlay" if args.writable else "read-only"
        server = srv.Server(argv, pidfile, captive=args.run is not None, s3_settings=settings)
        server.wait_ready()
        doc = _serve_doc(record, endpoint, args.writable, server.proc.pid)
        stopped = None
        if args.run is None:
            try:  # from the announcement on, a stop signal is the normal end: a client may send it at once
                clilog.summary(f"serving {record.id} ({human_bytes(record.size)}, {mode}) at {endpoint.uri}; "
                               f"{_how_to_stop()}")
                log.debug(f"kill -USR1 {os.getpid()} prints where each thread of this serve is")
                emit(args, doc, endpoint.uri)
                rc = server.wait()
            except KeyboardInterrupt as e:  # the normal way to stop a server
                stopped = getattr(e, "signum", None) or signal.SIGINT
                server.stop()
            else:
                if rc != 0:
                    raise ServeError(f"nbdkit serving {record.id} " + (
                        f"was killed by {_signame(-rc)}" if rc < 0 else f"exited with status {rc}")
                        + "; the export is gone")
        else:
            log.info(f"serving {record.id} ({mode}) at {endpoint.uri} to: {args.run}")
            rc = server.wait()
        counters = srv.read_stats(stats)
        clilog.summary(f"serve {record.id}: stopped" + (f" by {_signame(stopped)}" if stopped else "")
                       + f"; {_stats_line(counters)}")
        if args.run is not None:
            doc["run"] = {"command": args.run, "exit_code": rc}
            doc["stats"] = counters
            emit(args, doc, "")
            return rc
        return EXIT_OK
    finally:
        if server is not None:
            server.stop()
            if endpoint.socket:  # nbdkit leaves the socket file of a -U PATH behind
                _remove_socket(endpoint.socket)
        shutil.rmtree(tmpdir, ignore_errors=True)


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _signame(signum) -> str:
    from engine.signals import signal_name
    return signal_name(signum) if signum else "a signal"


def cmd_mount(args) -> int:
    from engine.nbd import mount
    record, _ = _resolve(args)
    settings = s3_settings(args)
    doc = mount.mount(args.store, record, args.directory, args.writable, args.cache,
                      s3_cache=args.s3_cache if settings else None, s3_settings=settings)
    clilog.summary(f"mounted {record.id} ({human_bytes(record.size)}, "
                   f"{'writable, writes kept in an overlay' if args.writable else 'read-only'}) as {doc['file']}; "
                   f"'blockvault umount {args.directory}' to take it down")
    emit(args, doc, doc["file"])
    return EXIT_OK


def cmd_umount(args) -> int:
    from engine.nbd import mount
    doc = mount.umount(args.directory)
    clilog.summary(f"unmounted {doc['directory']}" + (" (it was stale: its server had died)" if doc["stale"] else ""))
    emit(args, doc, "")
    return EXIT_OK


def _point_args(sp) -> None:
    add_store_arg(sp)
    sp.add_argument("backup", metavar="DISK@N", help="backup id: db01@3, db01@latest, db01@-1, db01@2026-11-30")
    sp.add_argument("--writable", action="store_true",
                    help="accept writes into a temporary copy-on-write overlay (nbdkit's cow filter); they are "
                         "lost when the export stops and never reach the store")
    sp.add_argument("--cache", type=argtypes.cache_size, default=DEFAULT_CACHE, metavar="SIZE",
                    help="memory for decoded chunks (default %(default)s)")


def register(sub) -> None:
    sp = add_command(sub, "serve", cmd_serve, "serve a backup point as an NBD export (nbdkit) until stopped",
                     "blockvault serve /backup/store db01@latest                  # Unix socket, URI printed\n"
                     "  blockvault serve /backup/store db01@3 --socket /run/db01.sock --writable\n"
                     "  blockvault serve /backup/store db01@3 --port 10809            # nbd://127.0.0.1:10809/\n"
                     "  blockvault serve /backup/store db01@3 --run 'qemu-img convert -O qcow2 \"$uri\" db01.qcow2'")
    _point_args(sp)
    sp.add_argument("--socket", metavar="PATH",
                    help="listen on this Unix socket (default: one in a new temporary directory)")
    sp.add_argument("--port", type=argtypes.port, metavar="N",
                    help="listen on TCP port N of 127.0.0.1 instead")
    sp.add_argument("--listen", metavar="ADDR",
                    help="listen on ADDR instead of 127.0.0.1 (0.0.0.0: every interface; NBD has no "
                         "authentication here, so anyone who reaches the port reads the disk)")
    sp.add_argument("--run", metavar="CMD",
                    help="run CMD (a shell command, $uri set to the export) and stop when it ends, with its "
                         "exit status (nbdkit's captive mode)")
    sp.add_argument("--parallel-requests", action="store_true",
                    help="serve the requests of one connection in parallel too (nbdkit's PARALLEL thread model; "
                         "connections always are). Not with Debian 12's nbdkit 1.32: it aborts when a client "
                         "disconnects with requests in flight")

    sp = add_command(sub, "mount", cmd_mount,
                     "make a backup point the file DIR/disk.raw (nbdfuse), in the background",
                     "blockvault mount /backup/store db01@latest /mnt/db01\n"
                     "  losetup -r -P -f --show /mnt/db01/disk.raw             # then mount its partitions\n"
                     "  blockvault umount /mnt/db01")
    _point_args(sp)
    sp.add_argument("directory", metavar="DIR", help="an existing empty directory")

    sp = add_command(sub, "umount", cmd_umount, "take down a mount made by 'blockvault mount'",
                     "blockvault umount /mnt/db01")
    sp.add_argument("directory", metavar="DIR")
