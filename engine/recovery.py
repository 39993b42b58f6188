"""``blockvault rebuild``: recreate what a store lost from its packs.

The packs are the store: every pack header carries the store's settings
(config.json's fields), and every commit wrote its catalog entries,
manifests, new segments and VM records as metadata records into a pack
before it committed them to LMDB (chunkstore/rebuild.py replays them).  So
``rebuild`` recreates the whole LMDB index, and ``rebuild --config``
recreates config.json.  The writes the engine puts into metadata records
are (database, key, value) triples of these databases: ``catalog``,
``manifests``, ``segments`` and ``vm_backups``.
"""

from __future__ import annotations

import collections

import lmdb
import dataclasses
import logging
import json
import os
import time

from chunkstore.config import CONFIG_FILE, ENCRYPTED_VERSION, FORMAT_NAME, FORMAT_VERSION, StoreConfig
from chunkstore.errors import IntegrityError, NotAStoreError, StoreError
from chunkstore.lock import WriterLock
from chunkstore.backend import LocalPackBackend
from chunkstore.rebuild import RebuildReport, rebuild_store
from chunkstore.refs import has_counts
from chunkstore.store import check_config, require_config, refuse_url
from engine.references import recount
from engine.repository import Repository

# Databases the engine writes through metadata records (docs/FORMAT.md).
METADATA_DBS = ("catalog", "manifests", "segments", "vm_backups")


def _derive(store):
    """The reference counts, recomputed in the rebuild's transaction (engine/references.py)."""
    repo = Repository(store)  # opens the engine's databases before the transaction begins
    return lambda txn, gen_floor: recount(repo, txn, gen_floor)


def rebuild(path: str, wait: float = 0.0, cache: str | None = None, s3_settings=None) -> RebuildReport:
    if s3_settings is not None:  # a store in a bucket: its cache's index, rebuilt from the bucket's packs
        return attach(path, cache, s3_settings)[0]
    refuse_url(path)
    require_config(path)
    cfg = StoreConfig.load(path)
    check_config(path, cfg)
    report = rebuild_store(path, wait, _derive)
    if cfg.version < FORMAT_VERSION:  # the rebuilt index has its counts: the store is format 3 now
        dataclasses.replace(cfg, version=FORMAT_VERSION).save(path)
        logging.getLogger("blockvault.store").warning(
            "store %s upgraded from format version %d to %d by the rebuild", path, cfg.version, FORMAT_VERSION)
    return report


def attach(url: str, cache: str | None, settings, take_over: bool = False) -> tuple[RebuildReport, dict]:
    """``blockvault attach``: this host's cache of a store in a bucket, made from the bucket alone
    (config.json, then the index rebuilt over the bucket's packs), the lease taken."""
    from chunkstore.s3store import prepare_attach
    started = time.monotonic()
    ctx, lease = prepare_attach(url, cache, settings, take_over)
    backend = ctx.backend()
    try:
        report = rebuild_store(ctx.cache, 0.0, _derive, backend=backend, s3=ctx, lease=lease)
    finally:
        lease.stop()
        backend.close()
    doc = {"store": ctx.url, "cache": os.path.abspath(ctx.cache), "host_id": ctx.host_id,
           "seconds": round(time.monotonic() - started, 3), **rebuild_doc(report)}
    return report, doc


def rebuild_doc(report: RebuildReport) -> dict:
    return {"packs": report.packs, "chunks": report.chunks, "duplicates": report.duplicates,
            "torn": report.torn, "unreadable": report.unreadable, "commits": report.commits,
            "records": {name: report.records.get(name, 0) for name in METADATA_DBS},
            "lost": report.lost, "bad_headers": report.bad_headers, "superseded": report.superseded,
            "left_out": report.left_out, "moved_aside": report.moved_aside,
            "previous_index": report.previous_index}


def rebuild_text(doc: dict) -> str:
    rec = doc["records"]
    lines = [f"index rebuilt: {doc['chunks']} chunks from {doc['packs']} packs; {doc['commits']} commits "
             f"replayed: {rec['catalog']} backups, {rec['vm_backups']} VM backups, {rec['manifests']} manifests, "
             f"{rec['segments']} segments"]
    if doc["moved_aside"]:
        lines.append(f"  the damaged index was moved to {doc['moved_aside']}")
    lines += [f"  torn tail ignored: {t}" for t in doc["torn"]]
    lines += [f"  NOT SAVED (damaged range, good records after it were kept): {x}" for x in doc["lost"]]
    lines += [f"  DAMAGED pack header (its records were read anyway): {x}" for x in doc["bad_headers"]]
    lines += [f"  unreadable pack: {u}" for u in doc["unreadable"]]
    lines += [f"  bad copy of a chunk stored again elsewhere: {x}" for x in doc["superseded"]]
    lines += [f"  left out: {x}" for x in doc["left_out"]]
    if doc["previous_index"]:
        lines.append(f"  the index it replaced is kept in {doc['previous_index']} (it may hold what the packs lack)")
    return "\n".join(lines)


def damage_message(report: RebuildReport) -> str:
    """Why a rebuild is not complete, for the error line and document."""
    missing = [x for x in report.left_out if " missing" in x or "incomplete" in x]
    what = [f"{n} {w}{'' if n == 1 else 's'}" for n, w in (
        (len(report.lost), "damaged range"), (len(report.bad_headers), "damaged pack header"),
        (len(report.unreadable), "unreadable pack"), (len(missing), "commit whose metadata is lost")) if n]
    return ("index rebuilt from what could be read, but not everything could be saved: " + ", ".join(what)
            + "".join(f"; {x}" for x in missing)
            + "; run 'blockvault verify' to see which backups it hurts")


def _index_version(path: str) -> int:
    """3 when the index keeps the reference counts (chunkstore/refs.py: meta ``format``), else 2:
    the next writer then counts them (a format-2 store's upgrade)."""
    try:
        env = lmdb.open(os.path.join(path, "index"), readonly=True, lock=False, max_dbs=64, subdir=True)
    except lmdb.Error:
        return 2
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            return FORMAT_VERSION if has_counts(txn, meta) else 2
    except lmdb.Error:
        return 2
    finally:
        env.close()


def recreate_config(path: str, wait: float = 0.0) -> dict:
    """Write config.json from the settings the pack headers agree on."""
    refuse_url(path)
    if not os.path.isdir(path):
        raise NotAStoreError(f"{path}: no such directory")
    lock = WriterLock(path)
    lock.acquire(wait, "rebuild --config")
    try:
        return _recreate_config(path)
    finally:
        lock.release()


def _recreate_config(path: str) -> dict:
    votes: collections.Counter = collections.Counter()
    where: dict[str, list[str]] = collections.defaultdict(list)
    unreadable = []
    packs = LocalPackBackend(path)
    for pack_id, _ in packs.list():
        pack = packs.name(pack_id)
        try:
            settings = packs.header(pack_id).settings()
        except (IntegrityError, OSError) as e:
            unreadable.append(f"{pack}: {e}")
            continue
        key = json.dumps(settings, sort_keys=True)
        votes[key] += 1
        where[key].append(pack)
    if not votes:
        raise NotAStoreError(
            f"{path}: no readable pack header to recover the store's settings from"
            + (f" ({len(unreadable)} unreadable)" if unreadable else " (no packs: the store holds no backups; "
               "'blockvault init' a new one)"))
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise StoreError(f"{path}: the pack headers disagree on the store's settings ({len(ranked)} different "
                         "sets, none held by most packs); packs of two stores were mixed: separate them first")
    chosen = json.loads(ranked[0][0])
    try:
        current = StoreConfig.load(path)
    except StoreError:
        current = None
    # An encrypted store's headers carry its cipher and key check: its config is format 4 whatever its index.
    version = ENCRYPTED_VERSION if chosen.get("encryption") else _index_version(path)
    cfg = StoreConfig(format=FORMAT_NAME, version=version, **chosen)
    cfg.validate()
    target = os.path.join(path, CONFIG_FILE)
    replaced, changed = None, True
    if os.path.exists(target):
        changed = current != cfg
        if changed:
            replaced = f"{target}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(target, replaced)
    if changed:
        cfg.save(path)
    return {"config": os.path.abspath(target), "changed": changed, "replaced": replaced,
            "store_id": cfg.store_id, "chunk_size": cfg.chunk_size, "digest": cfg.digest,
            "compression_level": cfg.compression_level, "pack_target_size": cfg.pack_target_size,
            "packs_read": sum(votes.values()), "unreadable": unreadable,
            "disagreeing": sorted(p for key, _ in ranked[1:] for p in where[key])}


def config_text(doc: dict) -> str:
    if not doc["changed"]:
        head = f"{doc['config']} already matches the {doc['packs_read']} pack headers; left as it is"
    else:
        head = (f"recreated {doc['config']} from {doc['packs_read']} pack headers (store {doc['store_id']}, "
                f"chunk size {doc['chunk_size']}, digest {doc['digest']}, zstd level {doc['compression_level']})")
        if doc["replaced"]:
            head += f"; the previous one is kept as {doc['replaced']}"
    lines = [head]
    lines += [f"  unreadable pack header: {u}" for u in doc["unreadable"]]
    lines += [f"  pack of other settings (ignored): {p}" for p in doc["disagreeing"]]
    return "\n".join(lines)
