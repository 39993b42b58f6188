"""The store's config file: the settings fixed when a store is created.

``config.json`` is the one file a reader needs before anything else: it names
the format version (so an old binary refuses a newer store instead of
misreading it), the chunk size, the digest kind with its per-store seed and
the compression level.  It is written once, atomically, by ``init``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from chunkstore import safefs
from chunkstore.errors import ConfigError, FormatVersionError, NotAStoreError

FORMAT_NAME = "blockvault-store"
FORMAT_VERSION = 3
# An encrypted store (chunkstore/crypto.py): a reader of version 3 must refuse
# it rather than misread keyed ids and sealed records.
ENCRYPTED_VERSION = 4
# 2 is read as it is; the first writer upgrades it (ChunkStore.upgrade_format).
READABLE_VERSIONS = (2, 3, ENCRYPTED_VERSION)
CONFIG_FILE = "config.json"

DIGEST_KINDS = ("xxh3-128", "sha256", "blake3-128-keyed")
CIPHER_NAMES = ("aes-256-gcm", "chacha20-poly1305")
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 8 << 20
# 256 KiB won the benchmark (bench/README.md, "Defaults chosen from figures").
DEFAULT_CHUNK_SIZE = 256 << 10
MIN_COMPRESSION_LEVEL, MAX_COMPRESSION_LEVEL = -7, 22
# zstd 1 compresses this workload within 0.3% of level 3, 37% faster (bench/README.md).
DEFAULT_COMPRESSION_LEVEL = 1
# Packs are sealed near this size: large enough to amortise per-file costs,
# small enough to be one object in S3-compatible storage later.
DEFAULT_PACK_TARGET = 32 << 20


@dataclass(frozen=True)
class StoreConfig:
    store_id: str
    chunk_size: int
    digest: str
    seed: int
    compression_level: int
    pack_target_size: int = DEFAULT_PACK_TARGET
    created: float = 0.0
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    # "" for a plaintext store, else the AEAD of its records (chunkstore/crypto.py)
    encryption: str = ""
    # 32 hex digits: MasterKey.check(store id), "" for a plaintext store
    key_check: str = ""

    @classmethod
    def new(
        cls,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        digest: str = "xxh3-128",
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        pack_target_size: int = DEFAULT_PACK_TARGET,
        encryption: str = "",
        master=None,
    ) -> "StoreConfig":
        """A new store's settings; ``encryption`` (a cipher name) needs the new
        store's ``master`` key (chunkstore/crypto.py MasterKey), whose check it keeps."""
        store_id = os.urandom(16)
        if encryption and master is None:
            raise ConfigError("an encrypted store needs its master key")
        cfg = cls(
            store_id=store_id.hex(),
            chunk_size=chunk_size,
            # an encrypted store's ids are keyed by its master key, not seeded
            digest="blake3-128-keyed" if encryption else digest,
            seed=0 if encryption else int.from_bytes(os.urandom(8), "little"),
            compression_level=compression_level,
            pack_target_size=pack_target_size,
            created=time.time(),
            version=ENCRYPTED_VERSION if encryption else FORMAT_VERSION,
            encryption=encryption,
            key_check=master.check(store_id).hex() if encryption else "",
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        cs = self.chunk_size
        if not isinstance(cs, int) or cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
            raise ConfigError(
                f"chunk size {cs} is not a power of two between 64K and 8M; "
                "pick one of 64K, 128K, 256K, 512K, 1M, 2M, 4M, 8M"
            )
        if self.digest not in DIGEST_KINDS:
            raise ConfigError(f"digest {self.digest!r} is unknown; use one of {', '.join(DIGEST_KINDS)}")
        level = self.compression_level
        if not isinstance(level, int) or not MIN_COMPRESSION_LEVEL <= level <= MAX_COMPRESSION_LEVEL:
            raise ConfigError(f"zstd compression level {level} is outside "
                              f"{MIN_COMPRESSION_LEVEL}..{MAX_COMPRESSION_LEVEL}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 1 << 64:
            raise ConfigError("store seed must be a 64-bit unsigned integer")
        if not isinstance(self.pack_target_size, int) or self.pack_target_size < 1 << 20:
            raise ConfigError("pack target size must be at least 1 MiB")
        if self.encryption:
            if self.encryption not in CIPHER_NAMES:
                raise ConfigError(f"encryption {self.encryption!r} is unknown; use one of {', '.join(CIPHER_NAMES)}")
            if self.digest != "blake3-128-keyed" or len(self.key_check) != 32 or self.version != ENCRYPTED_VERSION:
                raise ConfigError("an encrypted store has keyed blake3 ids, a 32-hex-digit key check and "
                                  f"format version {ENCRYPTED_VERSION}")
        elif self.digest == "blake3-128-keyed" or self.key_check or self.version == ENCRYPTED_VERSION:
            raise ConfigError("keyed ids, a key check and format version 4 belong to encrypted stores only")

    @property
    def encrypted(self) -> bool:
        return bool(self.encryption)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["seed"] = f"{self.seed:016x}"
        if not self.encryption:  # a plaintext store's config is what format 3 wrote
            del doc["encryption"], doc["key_check"]
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, store_path: str) -> "StoreConfig":
        path = os.path.join(store_path, CONFIG_FILE)
        if not os.path.isdir(store_path):
            raise NotAStoreError(f"{store_path}: no such directory; create a store with 'blockvault init {store_path}'")
        try:
            with os.fdopen(safefs.open_file(path, os.O_RDONLY, "store config"), "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            raise NotAStoreError(
                f"{store_path} is not a blockvault store (no {CONFIG_FILE}); "
                f"create one with 'blockvault init DIR' or point at an existing store"
            ) from None
        except (OSError, ValueError) as e:
            raise NotAStoreError(f"{path}: unreadable store config: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{path} is not a blockvault store config")
        version = doc.get("version")
        if version == 1:
            raise FormatVersionError(
                f"{store_path} has store format version 1; this blockvault reads versions 2 and 3 only "
                "(version 2 and later keep every backup's catalog entry and manifest in the packs too, so a lost index "
                "can be rebuilt; a version-1 store cannot be converted): restore what you need with the "
                "blockvault release that wrote it and back it up into a new store"
            )
        if version not in READABLE_VERSIONS:
            raise FormatVersionError(
                f"{store_path} has store format version {version!r}, this blockvault reads versions "
                f"2, {FORMAT_VERSION} and {ENCRYPTED_VERSION}; use a blockvault release that supports it"
            )
        try:
            cfg = cls(
                store_id=str(doc["store_id"]),
                chunk_size=int(doc["chunk_size"]),
                digest=str(doc["digest"]),
                seed=int(doc["seed"], 16),
                compression_level=int(doc["compression_level"]),
                pack_target_size=int(doc.get("pack_target_size", DEFAULT_PACK_TARGET)),
                created=float(doc.get("created", 0.0)),
                version=version,
                encryption=str(doc.get("encryption", "")),
                key_check=str(doc.get("key_check", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NotAStoreError(f"{path}: malformed store config ({e})") from None
        cfg.validate()
        return cfg

    def save(self, store_path: str) -> None:
        path = os.path.join(store_path, CONFIG_FILE)
        tmp = path + ".tmp"
        # It holds the digest seed: 0600, created anew (a link or a file left
        # under the temporary name is removed, never written through).
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        with os.fdopen(safefs.create_file(tmp, "store config"), "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(store_path)


def fsync_dir(path: str) -> None:
    """Make a directory entry (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(text: str) -> int:
    """'64K', '1M', '1048576' → bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise ConfigError(f"{text!r} is not a size; write it like 64K, 1M or 1048576") from None
    if value < 0:
        raise ConfigError(f"{text!r} is negative")
    return value
