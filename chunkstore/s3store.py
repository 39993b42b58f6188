"""Opening a store that lives in a bucket: ``s3://BUCKET/PREFIX`` plus a cache directory.

The bucket is the store (config.json, every pack, the lease); the cache
directory is laid out like a local store (config.json copy, index/, lock,
locks/, sessions/) with ``packs/`` as the upload spool and ``cache.json``
naming the store and this host::

    {"url": "s3://bucket/prefix", "endpoint": "http://...", "host_id": "<32 hex>"}

``host_id`` is random, made when the cache is made (init, attach): it is the
owner id of the lease (chunkstore/lease.py).  Writers take the lease when
their first write session opens and check it before every LMDB commit;
readers take nothing, but refuse a cache whose store another host has taken
over (its index is stale: ``blockvault attach`` rebuilds it).  Credentials are
never written anywhere: they come from the environment or ``--credentials``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from chunkstore import objectlock, safefs
from chunkstore.config import CONFIG_FILE, StoreConfig
from chunkstore.errors import (ConfigMismatchError, LeaseHeld, NotAStoreError, ObjectMissing, StoreExistsError)
from chunkstore.s3settings import S3Location, S3Settings, parse_store_url

log = logging.getLogger("blockvault.s3")

CACHE_FILE = "cache.json"
TMP_DIR = "tmp"       # whole-pack downloads (unnamed files) of chunkstore/s3backend.py
ENV_CACHE = "BLOCKVAULT_CACHE"
ENV_LEASE_TTL = "BLOCKVAULT_LEASE_TTL"   # seconds a lease lives unrenewed (default chunkstore/lease.py LEASE_TTL)


def default_cache(location: S3Location) -> str:
    """``$BLOCKVAULT_CACHE/<bucket>/<prefix, / as ~>`` or the same under ~/.cache/blockvault/s3."""
    base = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "blockvault", "s3")
    return os.path.join(base, location.bucket, location.prefix.replace("/", "~") or "~")


def holder_name() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


# An encrypted store's lease holder: this prefix, then base64url of ObjectCipher.seal (nonce,
# ciphertext, tag) of "HOST PID", with this associated data.
SEALED_HOLDER = "sealed:"
_HOLDER_AD = b"blockvault lease holder 1\0"


class S3Context:
    """What an open S3 store knows beyond a local one: its bucket, cache and host id."""

    def __init__(self, location: S3Location, settings: S3Settings, cache: str, host_id: str, bucket=None,
                 lease_bucket=None):
        from chunkstore.s3bucket import Bucket
        self.location = location
        self.settings = settings
        self.cache = cache
        self.host_id = host_id
        self.bucket = bucket if bucket is not None else Bucket(location, settings)
        # where the lease lives: the data bucket, or an object-lock store's companion (chunkstore/objectlock.py)
        self.lease_bucket = lease_bucket if lease_bucket is not None else self.bucket
        # an encrypted store's master key, once attach unlocked it (prepare_attach)
        self.master = None
        # an encrypted store's: seals the lease's holder, so the bucket names no host (set_key)
        self.holder_cipher = None

    def set_key(self, cipher: str, master, store_id: str) -> None:
        """An encrypted store's key, known: the lease's holder is sealed from now on."""
        from chunkstore.crypto import ObjectCipher
        self.master = master
        self.holder_cipher = ObjectCipher(cipher, master, bytes.fromhex(store_id))

    def holder(self) -> str:
        """The lease's ``holder``: "HOST PID", sealed in an encrypted store (docs/FORMAT.md "The lease")."""
        name = holder_name()
        if self.holder_cipher is None:
            return name
        import base64
        return SEALED_HOLDER + base64.urlsafe_b64encode(self.holder_cipher.seal(_HOLDER_AD, name.encode())).decode()

    def holder_text(self, holder: str) -> str:
        """A lease's holder as messages name it: a sealed one opened with the key when it can be."""
        if not str(holder).startswith(SEALED_HOLDER):
            return holder
        if self.holder_cipher is not None:
            import base64
            from chunkstore.errors import IntegrityError
            try:
                sealed = base64.urlsafe_b64decode(holder[len(SEALED_HOLDER):])
                return self.holder_cipher.open(_HOLDER_AD, sealed, "lease holder").decode(errors="replace")
            except (IntegrityError, ValueError):
                pass
        return "a host whose name is sealed with the store's key"

    @property
    def url(self) -> str:
        return self.location.url

    def backend(self, retain_days: float | None = None):
        from chunkstore.s3backend import S3PackBackend, clear_tmp
        tmp = os.path.join(self.cache, TMP_DIR)
        clear_tmp(tmp)
        return S3PackBackend(self.bucket, tmp, retain_days=retain_days)

    def take_lease(self, take_over: bool = False):
        from chunkstore.lease import LEASE_TTL, Lease
        ttl = float(os.environ.get(ENV_LEASE_TTL) or LEASE_TTL)
        lease = Lease.acquire(self.lease_bucket, self.host_id, self.holder(), take_over=take_over, ttl=ttl,
                              show=self.holder_text)
        lease.start_renewing()
        return lease

    def check_not_taken_over(self) -> None:
        """A reader's check: the lease, if any, names this cache's host."""
        from chunkstore.lease import LEASE_KEY, decode
        info = self.lease_bucket.head(LEASE_KEY)
        if info is None:
            return
        try:
            doc = decode(self.lease_bucket.get(LEASE_KEY), info.last_modified)
        except ObjectMissing:
            return
        if doc.get("host_id") != self.host_id:
            doc["holder"] = self.holder_text(str(doc.get("holder")))
            raise LeaseHeld(f"store {self.url} is now owned by {doc.get('holder')} (another host took its lease); "
                            f"this cache ({self.cache}) may miss its latest backups: run 'blockvault attach "
                            f"{self.url} --cache {self.cache}' to rebuild it from the bucket",
                            holder=str(doc.get("holder")), host_id=str(doc.get("host_id")))


def read_cache_file(cache: str) -> dict | None:
    try:
        with open(os.path.join(cache, CACHE_FILE), encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise NotAStoreError(f"{cache}: {CACHE_FILE} cannot be read ({e}); run 'blockvault attach' with a new "
                             "--cache directory") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("url"), str) or not isinstance(doc.get("host_id"), str):
        raise NotAStoreError(f"{cache}: {CACHE_FILE} is not a cache description; run 'blockvault attach' with a "
                             "new --cache directory")
    return doc


def write_cache_file(cache: str, url: str, endpoint: str | None, host_id: str) -> None:
    body = json.dumps({"url": url, "endpoint": endpoint or "", "host_id": host_id}, indent=1) + "\n"
    safefs.write_durably(os.path.join(cache, CACHE_FILE), body.encode(), "cache file")


def remote_config(bucket) -> bytes:
    """The bucket's config.json; NotAStoreError when the bucket holds no store."""
    try:
        data = bucket.get(CONFIG_FILE)
    except ObjectMissing:
        raise NotAStoreError(f"{bucket.url} is not a blockvault store (no {CONFIG_FILE} in the bucket at "
                             f"{bucket.settings.endpoint_name}); check the URL, or run 'blockvault init "
                             f"{bucket.url}' to make one") from None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not all(k in doc for k in _SAME):
            raise ValueError("fields missing")
    except ValueError as e:
        raise NotAStoreError(f"{bucket.url}: its {CONFIG_FILE} is not a blockvault store config ({e})") from None
    return data


_SAME = ("store_id", "chunk_size", "digest", "seed")


def check_cache_config(ctx: S3Context, local: StoreConfig) -> None:
    """The cache's copy of config.json must be the bucket's (another store at this URL since?)."""
    theirs = json.loads(remote_config(ctx.bucket))
    mine = json.loads(local.to_json())
    if theirs["store_id"] != mine["store_id"]:
        raise ConfigMismatchError(f"{ctx.cache} is the cache of store {mine['store_id']}, but {ctx.url} now holds "
                                  f"store {theirs['store_id']}: run 'blockvault attach {ctx.url}' with a new --cache "
                                  "directory")
    if any(theirs[k] != mine[k] for k in _SAME):
        raise ConfigMismatchError(f"{ctx.cache}/{CONFIG_FILE} disagrees with the bucket's {CONFIG_FILE} of {ctx.url}:"
                                  f" run 'blockvault attach {ctx.url} --cache {ctx.cache}' to refresh the cache")


def context_for(url: str, cache: str | None, settings: S3Settings | None) -> S3Context:
    """The S3Context of an existing cache of ``url``; NotAStoreError when there is none."""
    location = parse_store_url(url)
    settings = settings or S3Settings.resolve()
    cache = cache or default_cache(location)
    doc = read_cache_file(cache)
    if doc is None:
        raise NotAStoreError(f"{url}: no cache of this store at {cache} (this host has not attached it): run "
                             f"'blockvault attach {url} --cache {cache}' to build one from the bucket")
    if doc["url"] != location.url:
        raise NotAStoreError(f"{cache} is the cache of {doc['url']}, not of {location.url}: give another --cache")
    lock = objectlock.read_cache(cache)
    lease = objectlock.lease_bucket(location, settings, lock["lease_bucket"]) if lock else None
    return S3Context(location, settings, cache, doc["host_id"], lease_bucket=lease)


def check_new_cache(cache: str) -> None:
    if os.path.exists(cache):
        if not os.path.isdir(cache):
            raise StoreExistsError(f"cache {cache} exists and is not a directory")
        if os.listdir(cache):
            raise StoreExistsError(f"cache {cache} is not empty; give a new or empty --cache directory")


def prepare_new_cache(cache: str) -> None:
    check_new_cache(cache)
    os.makedirs(cache, mode=safefs.DIR_MODE, exist_ok=True)
    os.chmod(cache, safefs.DIR_MODE)


def _with_backend(cls, ctx: S3Context, create: bool, master=None, keys=None):
    from chunkstore.store import _open_env
    cfg = StoreConfig.load(ctx.cache)
    if cfg.encrypted and master is None and keys is not None:   # the cache's copies of the bucket's keys/
        from chunkstore.slotstore import LocalSlots
        master = keys.unlock(cfg, LocalSlots(ctx.cache), ctx.url)
    store = cls(ctx.cache, cfg, _open_env(ctx.cache, create=create), backend=ctx.backend(), master=master)
    if cfg.encrypted and master is not None:
        ctx.set_key(cfg.encryption, master, cfg.store_id)
    store.s3 = ctx
    store.location = ctx.url
    return store


def init_s3(cls, url: str, cache: str | None, settings: S3Settings | None, object_lock_days: float | None,
            store_settings: dict, lease_bucket: str | None = None):
    """``blockvault init s3://...``: bucket (made if absent), self-test, cache, config.json, lease.
    With ``object_lock_days``: a versioned, locked data bucket and a plain companion bucket
    for the lease and the self-test (chunkstore/objectlock.py); the lease is taken first."""
    import uuid
    from chunkstore.s3bucket import Bucket
    from chunkstore.s3check import check_conditional_writes
    location = parse_store_url(url)
    settings = settings or S3Settings.resolve()
    cache = cache or default_cache(location)
    check_new_cache(cache)  # before the bucket is touched: a refused init changes nothing
    bucket = Bucket(location, settings)
    lease_at = bucket
    if object_lock_days:
        name = lease_bucket or objectlock.default_lease_bucket(location.bucket)
        if name == location.bucket:
            raise StoreExistsError(f"--lease-bucket {name} is the store's own bucket: the lease needs a bucket "
                                   "without versioning; give another name")
        lease_at = objectlock.lease_bucket(location, settings, name)
    if not bucket.exists():
        bucket.create(object_lock=bool(object_lock_days))
    elif object_lock_days and not bucket.object_lock():
        raise StoreExistsError(f"bucket {location.bucket} exists without object lock; --object-lock needs a bucket "
                               "made with it: give a new bucket name (init creates it)")
    for key in (CONFIG_FILE, objectlock.STORE_LOCK_KEY):
        if bucket.head(key) is not None:
            raise StoreExistsError(f"{location.url} is already a store (its {key} exists); use it, or "
                                   f"'blockvault attach {location.url}' on a new host")
    if lease_at is not bucket and not lease_at.exists():
        lease_at.create()
    check_conditional_writes(lease_at)
    if bucket.head(CONFIG_FILE) is not None:   # made while the self-test ran (guarded atomically on plain buckets)
        raise StoreExistsError(f"{location.url} is already a store (its {CONFIG_FILE} exists); use it, or "
                               f"'blockvault attach {location.url}' on a new host")
    prepare_new_cache(cache)
    made = False
    store = None
    try:
        local = cls.init(cache, **store_settings)
        master = store_settings.get("master")
        local.close()
        with open(os.path.join(cache, CONFIG_FILE), "rb") as f:
            body = f.read()
        host_id = uuid.uuid4().hex
        write_cache_file(cache, location.url, settings.endpoint, host_id)
        ctx = S3Context(location, settings, cache, host_id, bucket, lease_bucket=lease_at)
        if store_settings.get("encryption"):
            ctx.set_key(store_settings["encryption"], master, json.loads(body)["store_id"])
        lease = None
        if object_lock_days:
            # The data bucket cannot refuse a second create atomically: the lease guards it.
            lease = ctx.take_lease()
            doc = {"lease_bucket": lease_at.location.bucket, "days": float(object_lock_days)}
            objectlock.write_cache(cache, doc)
        try:
            retain = time.time() + object_lock_days * 86400 if object_lock_days else None
            if object_lock_days and not bucket.put_new(objectlock.STORE_LOCK_KEY,
                                                       objectlock.encode(doc["lease_bucket"], doc["days"]),
                                                       retain_until=retain):
                raise StoreExistsError(f"{location.url} is already a store (another init made its "
                                       f"{objectlock.STORE_LOCK_KEY} just now)")
            _upload_slots(bucket, cache)   # before config.json: a store in the bucket always has its keys
            if not bucket.put_new(CONFIG_FILE, body, retain_until=retain):
                raise StoreExistsError(f"{location.url} is already a store (another init made its {CONFIG_FILE} "
                                       "just now)")
            made = True
            store = _with_backend(cls, ctx, create=False, master=master)
            store.backend.retain_days = object_lock_days or None
            if lease is not None:
                store.lease = lease
            else:
                store.take_lease()
        except BaseException:
            if store is not None:
                store.close()
            elif lease is not None:
                lease.stop()
                _drop_lease(lease_at)   # no store was made: a retry must not wait for its expiry
            raise
        return store
    finally:
        if not made:
            import shutil
            shutil.rmtree(cache, ignore_errors=True)


def _upload_slots(bucket, cache: str) -> None:
    """The key slots init wrote into the cache, put into the bucket's keys/ (docs/FORMAT.md)."""
    from chunkstore.keyslots import KEYS_DIR, slot_file
    from chunkstore.slotstore import LocalSlots
    local = LocalSlots(cache)
    for slot_id in local.ids():
        body = local.read_raw(slot_id)
        key = f"{KEYS_DIR}/{slot_file(slot_id)}"
        if not bucket.put_new(key, body) and bucket.get(key) != body:
            raise StoreExistsError(f"{bucket.url}: key slot {key} exists already; the bucket holds another "
                                   "store's keys: give a new prefix")


def _drop_lease(lease_at) -> None:
    from chunkstore.lease import LEASE_KEY
    try:
        lease_at.delete([LEASE_KEY])
    except Exception as exc:  # noqa: BLE001 - the init's own failure is what the user must see
        log.warning("the lease of a store that was not made stays in %s until it expires (%s)", lease_at.url, exc)


def open_s3(cls, url: str, cache: str | None, settings: S3Settings | None, master=None, keys=None):
    """An S3 store through its cache.  Readers stop here; writers take the lease at their first session.
    An encrypted store is unlocked with ``keys`` (chunkstore/keysource.py) from the cache's key slots."""
    ctx = context_for(url, cache, settings)
    store = _with_backend(cls, ctx, create=False, master=master, keys=keys)
    try:
        check_cache_config(ctx, store.config)
        ctx.check_not_taken_over()
        lock = objectlock.read_cache(ctx.cache)
        store.backend.retain_days = lock["days"] if lock else None
    except BaseException:
        store.close()
        raise
    return store


def prepare_attach(url: str, cache: str | None, settings: S3Settings | None, take_over: bool, keys=None):
    """``blockvault attach``: the cache made (or refreshed) from the bucket, the lease taken.
    Returns (S3Context, lease); the caller rebuilds the index over the bucket's packs.  An
    encrypted store is unlocked with ``keys`` from the bucket's key slots before anything is
    made (``ctx.master``): a wrong key changes nothing."""
    import uuid
    from chunkstore.s3bucket import Bucket
    from chunkstore.s3check import check_conditional_writes
    location = parse_store_url(url)
    settings = settings or S3Settings.resolve()
    cache = cache or default_cache(location)
    bucket = Bucket(location, settings)
    if not bucket.exists():
        from chunkstore.errors import NoSuchBucket
        raise NoSuchBucket(f"bucket {location.bucket} does not exist at {settings.endpoint_name}: check the URL "
                           "and the endpoint")
    body = remote_config(bucket)
    from chunkstore.slotstore import BucketSlots
    slot_bodies = BucketSlots(cache, bucket).fetch()
    master = _unlock_remote(body, slot_bodies, keys, location.url)
    lock = objectlock.read_remote(bucket)
    lease_at = objectlock.lease_bucket(location, settings, lock["lease_bucket"]) if lock else bucket
    if lock and not lease_at.exists():
        raise NotAStoreError(f"{location.url} keeps its lease in bucket {lock['lease_bucket']} "
                             f"({objectlock.STORE_LOCK_KEY}), which does not exist at {settings.endpoint_name}: "
                             f"make it (a bucket without versioning) and run attach again")
    check_conditional_writes(lease_at)
    doc = read_cache_file(cache) if os.path.isdir(cache) else None
    if doc is not None and doc["url"] != location.url:
        raise StoreExistsError(f"{cache} is the cache of {doc['url']}, not of {location.url}: give another --cache")
    if doc is None:
        prepare_new_cache(cache)
    host_id = doc["host_id"] if doc else uuid.uuid4().hex
    ctx = S3Context(location, settings, cache, host_id, bucket, lease_bucket=lease_at)
    if master is not None:
        config_doc = json.loads(body)
        ctx.set_key(config_doc["encryption"], master, config_doc["store_id"])
    try:
        lease = ctx.take_lease(take_over)
    except BaseException:
        if doc is None:  # the cache this attach made goes again
            import shutil
            shutil.rmtree(cache, ignore_errors=True)
        raise
    try:
        for sub in ("packs", "index"):
            safefs.make_dir(os.path.join(cache, sub), "store directory")
        safefs.write_durably(os.path.join(cache, CONFIG_FILE), body, "store config")
        BucketSlots(cache, bucket).replace_all(slot_bodies)   # an encrypted store's key slots
        write_cache_file(cache, location.url, settings.endpoint, host_id)
        if lock:
            objectlock.write_cache(cache, lock)
        else:
            try:
                os.unlink(os.path.join(cache, objectlock.CACHE_LOCK_FILE))
            except FileNotFoundError:
                pass
    except BaseException:
        lease.stop()
        raise
    return ctx, lease


def _unlock_remote(config_body: bytes, slot_bodies: dict, keys, url: str):
    """The master key of the bucket's store (None for a plaintext one), from its slots as fetched."""
    from types import SimpleNamespace
    from chunkstore.slotstore import MemorySlots
    doc = json.loads(config_body)
    if not doc.get("encryption"):
        return None
    if keys is None:
        from chunkstore.errors import KeyRequiredError
        raise KeyRequiredError(f"store {url} is encrypted; give its key (BLOCKVAULT_PASSPHRASE, --passphrase-file "
                               "FILE, --key-file FILE)")
    cfg = SimpleNamespace(store_id=str(doc.get("store_id", "")), key_check=str(doc.get("key_check", "")))
    return keys.unlock(cfg, MemorySlots(slot_bodies, url), url)
