"""``blockvault demo``: the whole cycle on a generated sparse image.

For a first run on a new machine: make a sparse image with a mix of text,
random and zero data, back it up (full), change some of it, back it up
again (incremental, with the changed areas CBT would report), restore both
points, compare them byte for byte with what was backed up, and verify the
store.  Everything lives in one scratch directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys

import numpy as np

from engine.backup import backup_image
from engine.errors import BadInputError
from engine.repository import Repository
from engine.restore import restore_backup
from engine.stats import store_stats
from engine.verify import verify_repository

BLOCK = 64 << 10
MARKER = ".blockvault-demo"
_MARKER_TEXT = "made by 'blockvault demo'; the demo may replace the files it made here\n"
# Everything the demo writes in its directory (and so may delete again on reuse).
_OWN = ("disk.img", "store", "changed-areas.json", "restore-1.img", "restore-2.img")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr)


def _block(rng: np.random.Generator, kind: int) -> bytes:
    if kind == 0:  # text-like: compressible
        words = rng.choice([b"disk ", b"block ", b"vault ", b"chunk ", b"backup\n", b"store "], size=BLOCK // 4)
        return b"".join(words)[:BLOCK].ljust(BLOCK, b".")
    if kind == 1:  # random: incompressible
        return rng.bytes(BLOCK)
    return bytes(BLOCK)  # written zeros


def write_image(path: str, size: int, seed: int, share: float = 0.25) -> None:
    """A sparse image: ``share`` of its 64 KiB blocks written, in runs."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        blocks = size // BLOCK
        pos = 0
        while pos < blocks:
            run = int(rng.integers(1, 64))
            if rng.random() < share:
                for b in range(pos, min(pos + run, blocks)):
                    f.seek(b * BLOCK)
                    f.write(_block(rng, int(rng.integers(0, 3))))
            pos += run + int(rng.integers(0, 64))


def mutate_image(path: str, seed: int, count: int) -> list[dict]:
    """Rewrite ``count`` random 64 KiB blocks; returns CBT-style changed areas."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    picks = sorted({int(b) for b in rng.integers(0, size // BLOCK, size=count)})
    with open(path, "r+b") as f:
        for b in picks:
            f.seek(b * BLOCK)
            f.write(_block(rng, int(rng.integers(0, 2))))
    return [{"start": b * BLOCK, "length": BLOCK} for b in picks]


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_directory(directory: str) -> None:
    """Create ``directory``, or clear a directory an earlier demo made; refuse anything else.

    Nothing is deleted unless the directory carries the demo's marker, and
    then only the files the demo makes."""
    def refuse(why: str) -> BadInputError:
        return BadInputError(f"demo directory {directory} {why}; nothing was changed. The demo only uses a "
                             "new directory, an empty one, or one an earlier demo made: choose another --dir")

    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        os.makedirs(directory)
    else:
        if stat.S_ISLNK(st.st_mode):
            raise refuse("is a symbolic link")
        if not stat.S_ISDIR(st.st_mode):
            raise refuse("exists and is not a directory")
        entries = sorted(os.listdir(directory))
        marker = os.path.join(directory, MARKER)
        if entries and not (MARKER in entries and stat.S_ISREG(os.lstat(marker).st_mode)):
            if "config.json" in entries and "index" in entries:
                raise refuse("is a blockvault store")
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise refuse(f"exists, holds {len(entries)} entries ({shown}) and was not made by the demo "
                         f"(no {MARKER} file)")
        for name in _OWN:
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write(_MARKER_TEXT)


def run_demo(directory: str, size: int, quiet: bool = False) -> dict:
    directory = os.path.abspath(directory)
    prepare_directory(directory)
    image, store = os.path.join(directory, "disk.img"), os.path.join(directory, "store")
    _say(quiet, f"demo in {directory}: generating a sparse image of {size >> 20} MiB")
    write_image(image, size, seed=1)
    steps, ok = [], True
    with Repository.init(store) as repo:
        full = backup_image(repo, image, "demo-disk", "full")
        digests = {full.id: file_digest(image)}
        _say(quiet, f"full backup {full.id}: read {full.stats['bytes_read'] >> 20} MiB, "
                    f"stored {full.stats['stored_bytes'] >> 20} MiB in {full.stats['duration']:.2f}s")
        areas = mutate_image(image, seed=2, count=max(4, size // BLOCK // 200))
        cbt = os.path.join(directory, "changed-areas.json")
        with open(cbt, "w") as f:
            json.dump({"startOffset": 0, "length": size, "changedArea": areas}, f)
        inc = backup_image(repo, image, "demo-disk", "incremental", cbt)
        digests[inc.id] = file_digest(image)
        _say(quiet, f"incremental {inc.id}: read {inc.stats['bytes_read'] >> 10} KiB, "
                    f"stored {inc.stats['stored_bytes'] >> 10} KiB in {inc.stats['duration']:.2f}s")
        for rec in (full, inc):
            target = os.path.join(directory, f"restore-{rec.seq}.img")
            restore_backup(repo, rec.id, target)
            same = file_digest(target) == digests[rec.id]
            ok &= same
            steps.append({"id": rec.id, "restored": target, "identical": same})
            _say(quiet, f"restored {rec.id}: {'identical' if same else 'DIFFERENT'} to the source")
        report = verify_repository(repo)
        ok &= report.ok
        _say(quiet, f"verify: {'OK' if report.ok else 'DAMAGED'} ({report.chunks.chunks_checked} chunks)")
        stats = store_stats(repo)
    _say(quiet, f"store: {stats['stored_bytes'] >> 20} MiB for {stats['logical_bytes'] >> 20} MiB "
                f"logical; demo {'passed' if ok else 'FAILED'}")
    return {"ok": ok, "directory": directory, "restores": steps, "verify_ok": report.ok, "stats": stats,
            "backups": [full.summary(), inc.summary()]}
