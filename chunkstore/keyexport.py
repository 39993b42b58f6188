"""The two key files a person keeps: a key-file slot's secret, and a key export.

A **key file** (``init --new-key-file``, ``key add --new-key-file``) holds 32
random bytes that open one key-file slot; removing that slot makes the file
useless.  A **key export** (``key export STORE FILE``) holds the master key
itself: it opens the store whatever slots are left, so it is the paper
backup, to be kept off site, apart from the store.  Both are short text
made to be printed and typed back in: an export is four lines of 16 bytes
in 8-digit groups, each line with its own 4-digit check, so a typo is found
on the line where it was made (docs/FORMAT.md "Key export").  ``--key-file``
accepts either; neither ever goes through argv or a log.
"""

from __future__ import annotations

import hashlib
import os

from chunkstore import safefs
from chunkstore.crypto import MASTER_SIZE, MasterKey
from chunkstore.errors import StoreError

EXPORT_MAGIC = "blockvault key export 1"
KEY_FILE_MAGIC = "blockvault key file 1"
SECRET_SIZE = 32
_LINE_BYTES = 16
_LINE_INFO = b"blockvault export line 1\0"


class KeyFileError(StoreError):
    """A --key-file that is missing, unreadable or not a key file (nothing of its content is said)."""


def _line_check(n: int, store_id: bytes, chunk: bytes) -> str:
    return hashlib.sha256(_LINE_INFO + bytes([n]) + store_id + chunk).hexdigest()[:4]


def export_text(master: MasterKey, store_id: bytes, cipher: str, location: str) -> str:
    raw = master.to_bytes()
    location = "".join(c if c.isprintable() else "?" for c in location)   # one comment line, whatever the path
    lines = [EXPORT_MAGIC,
             f"# The master key of blockvault store {location}. It opens the store whatever key",
             "# slots it has: keep it secret, off site, apart from the store. Losing every key",
             "# (this export, the passphrases and key files) loses every backup in the store.",
             f"store {store_id.hex()}",
             f"cipher {cipher}"]
    for n in range(MASTER_SIZE // _LINE_BYTES):
        chunk = raw[n * _LINE_BYTES:(n + 1) * _LINE_BYTES]
        groups = " ".join(chunk[i:i + 4].hex() for i in range(0, _LINE_BYTES, 4))
        lines.append(f"{n + 1} {groups}  {_line_check(n + 1, store_id, chunk)}")
    lines.append(f"check {master.check(store_id).hex()}")
    return "\n".join(lines) + "\n"


def key_file_text(secret: bytes) -> str:
    return (f"{KEY_FILE_MAGIC}\n# opens a key-file slot of a blockvault store: keep it secret (mode 0600)\n"
            f"{secret.hex()}\n")


class KeyMaterial:
    """What a --key-file holds: a master key (an export, with its store id) or a slot secret."""

    def __init__(self, master: MasterKey | None = None, store_id: bytes | None = None, secret: bytes | None = None):
        self.master, self.store_id, self.secret = master, store_id, secret

    def __repr__(self) -> str:
        return "KeyMaterial(<secret>)"


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse_key_file(text: str, where: str) -> KeyMaterial:
    """A key file or an export; KeyFileError naming ``where`` and the line, never the bytes."""
    lines = _lines(text)
    if not lines or lines[0] not in (EXPORT_MAGIC, KEY_FILE_MAGIC):
        raise KeyFileError(f"{where} is not a blockvault key file or key export (its first line is not "
                           f"'{KEY_FILE_MAGIC}' or '{EXPORT_MAGIC}')")
    if lines[0] == KEY_FILE_MAGIC:
        try:
            secret = bytes.fromhex("".join(lines[1:]))
        except ValueError:
            secret = b""
        if len(secret) != SECRET_SIZE:
            raise KeyFileError(f"{where}: a key file holds {SECRET_SIZE} bytes in hex after its first line; "
                               "this one does not (damaged or cut short)")
        return KeyMaterial(secret=secret)
    fields = {}
    rows = {}
    for ln in lines[1:]:
        word, _, rest = ln.partition(" ")
        if word.isdigit():
            rows[int(word)] = rest
        else:
            fields[word] = rest.strip()
    try:
        store_id = bytes.fromhex(fields["store"])
    except (KeyError, ValueError):
        raise KeyFileError(f"{where}: the export's 'store' line is missing or damaged") from None
    raw = b""
    for n in range(1, MASTER_SIZE // _LINE_BYTES + 1):
        parts = rows.get(n, "").split()
        try:
            chunk = bytes.fromhex("".join(parts[:-1]))
        except ValueError:
            chunk = b""
        if len(chunk) != _LINE_BYTES or not parts or parts[-1].lower() != _line_check(n, store_id, chunk):
            raise KeyFileError(f"{where}: key line {n} of the export is missing or mistyped (its check digits "
                               "do not match): compare it with the paper copy")
        raw += chunk
    master = MasterKey.from_bytes(raw)
    check = fields.get("check", "")
    if check and check.lower() != master.check(store_id).hex():
        raise KeyFileError(f"{where}: the export's 'check' line does not match its key lines (damaged)")
    return KeyMaterial(master=master, store_id=store_id)


def read_key_file(path: str, what: str = "--key-file") -> KeyMaterial:
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 10)
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise KeyFileError(f"{what} {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path} is not a blockvault key file (not text)") from None
    return parse_key_file(text, f"{what} {path}")


def write_secret_file(path: str, text: str, what: str) -> None:
    """A new 0600 file holding ``text``; an existing file is never overwritten."""
    try:
        fd = safefs.create_file(path, what)
    except FileExistsError:
        raise StoreError(f"{what} {path} exists already; give a new file name (a key file is never "
                         "overwritten)") from None
    except FileNotFoundError:
        raise StoreError(f"{what} {path}: its directory does not exist") from None
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
