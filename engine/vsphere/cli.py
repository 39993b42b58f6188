"""``blockvault vsphere ...``: VM backups, disaster recovery and the VM list.

Registered into the main parser by engine/cli/ (``register``); errors,
exit codes and ``--json`` follow engine/cli/: 0 success, 1 an error on
stderr, 2 usage, 4 store busy, 130 interrupted.  Warnings (CBT fallbacks, a
removed left-over snapshot...) do not fail a run: they go to stderr as they
happen (engine/clilog.py) and into the ``warnings`` list of ``--json``
output; a backup and a restore end with a one-line summary on stderr, and
``-v`` shows each disk and each step.

Credentials come from ``BLOCKVAULT_VSPHERE_USER``/``BLOCKVAULT_VSPHERE_PASSWORD``
or ``--credentials FILE``; there is deliberately no option that takes them.
pyvmomi is imported only when a vsphere command runs.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine import argtypes, clilog
from engine.commandline import add_command, common_options, emit, print_table, printable
from engine.progress import Progress, human_bytes

EXIT_OK = 0

EPILOG = """\
examples:
  export BLOCKVAULT_VSPHERE_USER=backup@vsphere.local BLOCKVAULT_VSPHERE_PASSWORD=...
  blockvault vsphere vms --server vc.lab --thumbprint AA:BB:... --store /backup/store
  blockvault vsphere backup /backup/store --server vc.lab --thumbprint AA:BB:... --vm web01
  blockvault vsphere list /backup/store --vm web01
  blockvault vsphere restore /backup/store web01@3 --server vc.lab --thumbprint AA:BB:... --name web01-dr
  blockvault vsphere backup s3://backups/vms --endpoint https://rgw.lab:443 --server vc.lab --thumbprint AA:BB:... --vm web01

STORE is a directory or s3://BUCKET/PREFIX, as for every blockvault command; for a store in a bucket
the S3 options are --endpoint, --cache, --s3-credentials and --s3-ca-file (--credentials and --ca-file
are vCenter's here).

Without --thumbprint or --ca-file the server certificate is checked against the system's CAs;
--insecure skips the check (labs only).
"""


def _log():
    """The vSphere logger; ``logging`` is imported here, not at start-up,
    since every blockvault command loads this module to register its parser.
    Its records go to stderr (and --log-file) through engine/clilog.py."""
    import logging
    return logging.getLogger("blockvault.vsphere")


def _progress(args, label: str) -> Progress:
    return Progress(label, enabled=False if (args.json or args.quiet) else None)


def _steps(event: str, detail: dict) -> None:
    """Each step of a run (snapshot taken, disks read...), shown with -v."""
    _log().debug("%s %s", event, ", ".join(f"{k} {v}" for k, v in detail.items()))


def _connect(args):
    try:
        import pyVmomi  # noqa: F401
    except ImportError:
        from engine.vsphere.errors import VsphereError
        raise VsphereError("the vsphere commands need pyvmomi: pip install 'blockvault[vsphere]'") from None
    from engine.credentials import load_credentials
    from engine.vsphere.connection import Connection, Endpoint, TlsPolicy

    creds = load_credentials(args.credentials)
    tls = TlsPolicy(args.thumbprint, args.ca_file, args.insecure)
    return Connection(Endpoint.parse(args.server), creds, tls, timeout=args.timeout)


def _open_store(args):
    """STORE as every verb opens it (engine/cli/common.py): a directory, or
    s3://BUCKET/PREFIX with the bucket options (and whatever else the shared
    store options grow, e.g. keys)."""
    from engine.cli.common import open_repo
    return open_repo(args)


def _check_store_options(args) -> None:
    """The store's options, checked before credentials or a connection: an S3
    option with a local STORE (or, for ``vms``, without --store) is a usage error."""
    from engine.cli.common import store_kwargs
    if not args.store:
        given = [name for name in ("endpoint", "cache", "credentials", "ca_file") if getattr(args, f"s3_{name}", None)]
        if given:
            from engine.errors import UsageError
            raise UsageError(f"--{given[0].replace('_', '-')} is for the store given with --store "
                             "s3://BUCKET/PREFIX; add --store or leave it out")
        return
    store_kwargs(args)


# -- commands -----------------------------------------------------------------------


def cmd_backup(args) -> int:
    from engine.vsphere.backup import BackupOptions, backup_vm
    from engine.vsphere.inventory import find_vm

    started = time.monotonic()
    options = BackupOptions(mode=args.mode, transport=args.transport, vddk_library=args.vddk_library,
                            vddk_transports=args.vddk_transports, quiesce=args.quiesce, cbt_sample=args.cbt_sample,
                            workers=args.threads, wait=args.wait, on_event=_steps, at=args.time)
    with _progress(args, f"backup {args.vm}") as progress, _open_store(args) as repo, \
            _connect(args) as conn:
        vm = find_vm(conn, args.vm)
        result = backup_vm(repo, conn, vm, options, on_plan=progress.set_total, on_progress=progress.advance)
        progress.finish()
    rec = result.record
    doc = {**rec.summary(), "warnings": result.warnings}
    read = sum(d.get("bytes_read", 0) for d in rec.disks)
    stored = sum(d.get("stored_bytes", 0) for d in rec.disks)
    clilog.summary(
        f"vsphere backup {rec.id} {rec.kind}: {len(rec.disks)} disk(s), read {human_bytes(read)}, stored "
        f"{human_bytes(stored)}, {len(result.warnings)} warning(s), {time.monotonic() - started:.1f} s",
        [f"{d['backup']} {d['kind']}: read {human_bytes(d.get('bytes_read', 0))} ({d.get('read')}"
         f"{', ' + d['reason'] if d.get('reason') else ''})" for d in rec.disks])
    emit(args, doc, rec.id)
    return EXIT_OK


def cmd_restore(args) -> int:
    from engine.swapped import check_vm_restore
    from engine.vsphere.restore import RestoreOptions, restore_vm
    from engine.vsphere.vmcatalog import parse_vm_ref
    check_vm_restore(args.store, args.backup)
    parse_vm_ref(args.backup)  # a malformed id is a usage error before credentials or a connection
    _check_store_options(args)

    started = time.monotonic()
    options = RestoreOptions(name=args.name, datacenter=args.datacenter, datastore=args.datastore,
                             folder=args.folder, resource_pool=args.resource_pool, host=args.host,
                             transport=args.transport, vddk_library=args.vddk_library,
                             vddk_transports=args.vddk_transports, tmp_dir=args.tmp_dir, workers=args.threads,
                             on_event=_steps)
    with _progress(args, f"restore {args.backup}") as progress, _open_store(args) as repo, \
            _connect(args) as conn:
        result = restore_vm(repo, conn, args.backup, options, on_start=progress.set_total,
                            on_progress=progress.advance)
        progress.finish()
    for note in result.notes:
        _log().warning(note)
    doc = {"backup": result.backup, "vm": result.vm, "moref": result.moref, "transport": result.transport,
           "disks": result.disks, "warnings": result.notes}
    clilog.summary(f"vsphere restore {result.backup} as VM {result.vm} ({result.moref}): "
                   f"{len(result.disks)} disk(s), powered off, {len(result.notes)} warning(s), "
                   f"{time.monotonic() - started:.1f} s")
    emit(args, doc, "")
    return EXIT_OK


def cmd_vms(args) -> int:
    from engine.vsphere.inventory import list_vms
    from engine.vsphere.vmcatalog import VmCatalog, vm_backup_name

    if args.store:  # refused before connecting, like every command that takes a store
        from chunkstore.store import refuse_url
        refuse_url(args.store)
    _check_store_options(args)
    with _connect(args) as conn:
        vms = list_vms(conn)
    last: dict[str, dict] = {}
    if args.store:
        with _open_store(args) as repo:
            catalog = VmCatalog(repo.store)  # opens its database: before the read transaction
            with repo.store.read_txn() as txn:
                for s in vms:
                    rec = catalog.latest(txn, vm_backup_name(s.name))
                    if rec:
                        last[s.moref] = {"id": rec.id, "time": rec.time, "kind": rec.kind}
    docs = [{"name": s.name, "moref": s.moref, "power_state": s.power_state, "cbt_enabled": s.cbt_enabled,
             "cbt_supported": s.cbt_supported, "disks": s.disks, "capacity": s.capacity,
             "last_backup": last.get(s.moref)} for s in vms]
    if args.json:
        emit(args, {"server": args.server, "vms": docs}, "")
        return EXIT_OK
    rows = [("NAME", "MOREF", "POWER", "CBT", "DISKS", "CAPACITY", "LAST BACKUP")]
    for d in docs:
        cbt = "on" if d["cbt_enabled"] else ("off" if d["cbt_supported"] else "unsupported")
        lb = d["last_backup"]
        lb_text = (f"{lb['id']} ({lb['kind']}, {time.strftime('%Y-%m-%d %H:%M', time.localtime(lb['time']))})"
                   if lb else ("-" if args.store else "(no --store)"))
        rows.append((d["name"], d["moref"], d["power_state"], cbt, str(d["disks"]), human_bytes(d["capacity"]),
                     lb_text))
    print_table(rows)
    return EXIT_OK


def cmd_list(args) -> int:
    from engine.vsphere.vmcatalog import VmCatalog, vm_backup_name

    with _open_store(args) as repo:
        catalog = VmCatalog(repo.store)  # opens its database: before the read transaction
        with repo.store.read_txn() as txn:
            records = list(catalog.for_vm(txn, vm_backup_name(args.vm)) if args.vm else catalog.all(txn))
    if args.json:
        emit(args, {"vm_backups": [r.summary() for r in records]}, "")
        return EXIT_OK
    if not records:
        print(printable("no VM backups" + (f" of {args.vm}" if args.vm else "")))
        return EXIT_OK
    rows = [("ID", "TIME", "KIND", "BASE", "DISKS", "READ", "WARNINGS", "PROTECTED", "NOTE")]
    for r in records:
        rows.append((r.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.time)), r.kind, r.base or "-",
                     str(len(r.disks)), human_bytes(sum(d.get("bytes_read", 0) for d in r.disks)),
                     str(len(r.warnings)), "yes" if r.protected else "-", r.note or "-"))
    print_table(rows)
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------


def _server_options(sp) -> None:
    g = sp.add_argument_group("vCenter connection")
    g.add_argument("--server", required=True, metavar="HOST[:PORT]", help="vCenter or ESXi host (port 443 by default)")
    g.add_argument("--credentials", metavar="FILE",
                   help="file with 'user=...' and 'password=...' lines; default: BLOCKVAULT_VSPHERE_USER and "
                        "BLOCKVAULT_VSPHERE_PASSWORD from the environment")
    tls = g.add_mutually_exclusive_group()
    tls.add_argument("--thumbprint", metavar="SHA", help="pin the server certificate (SHA-1/256/512, hex, colons ok)")
    tls.add_argument("--ca-file", metavar="FILE", help="check the server certificate against this CA bundle")
    tls.add_argument("--insecure", action="store_true", help="do not check the server certificate (labs only)")
    g.add_argument("--timeout", type=argtypes.timeout_seconds, default=120.0, metavar="SECONDS",
                   help="give up on a silent connection after this long (default %(default)s)")


def _transport_options(sp) -> None:
    g = sp.add_argument_group("disk transport")
    g.add_argument("--transport", choices=("auto", "vddk", "http"), default="auto",
                   help="vddk (VMware's VDDK library), http (datastore file access); default: vddk when a "
                        "VDDK library is found, else http")
    g.add_argument("--vddk-library", metavar="PATH",
                   help="libvixDiskLib or its directory (default: $BLOCKVAULT_VDDK_LIBRARY, then "
                        "/usr/lib/vmware-vix-disklib and similar)")
    g.add_argument("--vddk-transports", metavar="MODES", help="VDDK transport modes to try, e.g. hotadd:nbdssl")


def register(sub) -> None:
    """Add the ``vsphere`` command group to blockvault's subparsers.  STORE is
    engine/cli/common.py's (add_store_arg): engine/cli/__init__.py add_store_options
    then gives every vsphere verb the store options the other verbs have."""
    from engine.cli.common import add_store_arg, add_store_option
    group = sub.add_parser("vsphere", help="back up and recover vSphere VMs (CBT, snapshots, pyvmomi)",
                           description="Back up whole vSphere VMs with Changed Block Tracking; recreate them.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(group)  # so that `blockvault vsphere --json backup ...` works too
    vsub = group.add_subparsers(dest="vsphere_command", metavar="COMMAND", required=True)

    def cmd(name, func, help_text, example):
        return add_command(vsub, name, func, help_text, example)

    sp = cmd("backup", cmd_backup, "back up every disk of a VM as the next point VM@N",
             "blockvault vsphere backup /backup/store --server vc.lab --thumbprint AA:BB:.. --vm web01")
    add_store_arg(sp)
    sp.add_argument("--vm", required=True, help="VM name, moref (vm-42) or inventory path (DC/vm/folder/name)")
    sp.add_argument("--mode", choices=("auto", "full", "incremental", "differential"), default="auto",
                    help="auto (default): incremental when the store has an earlier backup of the VM, else full; "
                         "differential: changes since the last full")
    sp.add_argument("--quiesce", action="store_true", help="quiesce the guest file systems (needs VMware Tools)")
    sp.add_argument("--time", type=argtypes.point_time, default=None, metavar="ISO8601", help=argtypes.TIME_HELP)
    sp.add_argument("--cbt-sample", type=argtypes.share, default=0.001, metavar="SHARE",
                    help="share of the chunks CBT reports unchanged that are re-read and compared with the base, "
                         "at least one chunk (default %(default)s, i.e. 1 GiB of a 1 TiB disk; 0 turns the "
                         "check off)")
    sp.add_argument("--wait", type=argtypes.wait_seconds, default=0.0, metavar="SECONDS",
                    help="wait this long for another backup of the same VM (or a rebuild) to finish, "
                         "inf: as long as it takes "
                         "(default: fail at once)")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: one per core)")
    _server_options(sp)
    _transport_options(sp)

    sp = cmd("restore", cmd_restore, "recreate a VM from a backup (disaster recovery) as a new VM",
             "blockvault vsphere restore /backup/store web01@3 --server vc.lab --thumbprint AA:BB:.. --name web01-dr")
    add_store_arg(sp)
    sp.add_argument("backup", metavar="VM@N",
                    help="VM backup id: web01@3, web01@latest, web01@-1 (the one before the latest), "
                         "web01@2026-11-30 (the last of that day)")
    sp.add_argument("--name", required=True, help="name of the new VM")
    sp.add_argument("--datacenter", help="datacenter (default: the original VM's, else the first)")
    sp.add_argument("--datastore", help="datastore for the VM and its disks (default: the original VM's)")
    sp.add_argument("--folder", help="VM folder, name or inventory path (default: the datacenter's VM folder)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument("--resource-pool", help="resource pool, name or inventory path")
    where.add_argument("--host", help="ESXi host to run the VM on")
    sp.add_argument("--tmp-dir", metavar="DIR",
                    help="where the http transport stages each disk as a sparse file (default: $TMPDIR)")
    sp.add_argument("--threads", type=argtypes.threads, default=None,
                    help="worker threads, 1-256 (default: two per core)")
    _server_options(sp)
    _transport_options(sp)

    sp = cmd("vms", cmd_vms, "list the server's VMs with their CBT state (and last backup, with --store)",
             "blockvault vsphere vms --server vc.lab --thumbprint AA:BB:.. --store /backup/store")
    add_store_option(sp)
    _server_options(sp)

    sp = cmd("list", cmd_list, "list the VM backups of a store", "blockvault vsphere list /backup/store --vm web01")
    add_store_arg(sp)
    sp.add_argument("--vm", help="only this VM")
