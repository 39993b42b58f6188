"""The order of a real backup's syncs, as the kernel sees it (strace).

A crash loop with SIGKILL cannot see a missing fsync: the page cache
survives the kill.  So this test runs a real backup under ``strace -f`` and
checks the order of its system calls instead: before LMDB syncs a
transaction (``fdatasync`` of data.mdb, then the meta page written through
its O_DSYNC descriptor), every pack that transaction mentions must have
been written in full, fsynced, and its ``packs/XX`` directory fsynced.

Which packs a transaction mentions is read from the bytes it writes: the
index entries (``chunks``) begin with the 16-byte pack id and the ``packs``
database is keyed by it, and pack ids are random, so a pack id found in the
pages a transaction writes is a pack that transaction references.  Small
packs and a low checkpoint threshold (set in the child before the CLI runs)
make the session checkpoint several times during the backup, so the
checkpoint transactions are checked as well as the final commit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from chunkstore import ChunkStore
from chunkstore.index import IndexEntry
from chunkstore.pack import METADATA_MAGIC, pack_relpath, scan_pack
from engine.repository import Repository
from engine.restore import restore_backup
from helpers import REPO_ROOT, rng, same_file, write_at

CS = 64 << 10
CHECKPOINT_ENTRIES = 12
CALLS = "openat,fsync,fdatasync,msync,rename,renameat,renameat2,pwrite64,pwritev,pwritev2,write,writev,lseek"
# The backup as the CLI runs it, with the session's checkpoint threshold lowered.
CHILD = ("import runpy, sys; import chunkstore.session as s; s.CHECKPOINT_ENTRIES = int(sys.argv[1]); "
         "sys.argv = ['blockvault'] + sys.argv[2:]; runpy.run_module('engine.cli', run_name='__main__')")


def _strace() -> str:
    path = shutil.which("strace")
    if path is None or subprocess.run([path, "-f", "-o", os.devnull, "true"]).returncode != 0:
        why = "strace is not installed" if path is None else "strace cannot trace here (ptrace refused)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI must run the durability-order test (tools/install.sh --test installs strace)")
        pytest.skip(f"DURABILITY ORDER NOT CHECKED: {why} (tools/install.sh --test installs it)")
    return path


# -- the strace log ---------------------------------------------------------------

LINE = re.compile(r"^(\d+)\s+(?:(\w+)\((.*)|<\.\.\. (\w+) resumed>(.*))$")
FD_PATH = re.compile(r"^-?\d+<((?:\\x[0-9a-f]{2}|[^>\\])*)>")  # -xx escapes paths too
HEX = re.compile(r"\\x([0-9a-f]{2})")
STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')


@dataclass
class Call:
    name: str
    path: str            # the path of the first argument's descriptor (-y)
    args: str
    start: int           # line number of the call's entry
    end: int = -1        # line number of its return
    data: bytes = b""    # what a write call wrote (as far as -s shows it)


def parse(log: str) -> list[Call]:
    """One Call per system call, with entry and return positions in the log."""
    calls: list[Call] = []
    pending: dict[str, Call] = {}
    for n, line in enumerate(log.splitlines()):
        m = LINE.match(line)
        if not m:
            continue  # signals, exits
        pid = m.group(1)
        if m.group(2):
            name, rest = m.group(2), m.group(3)
            fd = FD_PATH.match(rest)
            path = HEX.sub(lambda h: chr(int(h.group(1), 16)), fd.group(1)) if fd else ""
            call = Call(name, path, rest, n)
            calls.append(call)
            if rest.endswith(" <unfinished ...>"):
                call.args = rest[:-len(" <unfinished ...>")]
                pending[pid] = call
            else:
                call.end = n
        else:
            call = pending.pop(pid)
            call.args += m.group(5)
            call.end = n
        if call.end >= 0 and call.name.startswith(("pwrite", "write")):
            call.data = b"".join(bytes.fromhex(s.replace("\\x", "")) for s in STRING.findall(call.args))
    assert not pending, f"calls that never returned: {pending}"
    return calls


def _offset(call: Call) -> int:
    return int(call.args.rsplit(",", 1)[1].split(")")[0])


@dataclass
class Txn:
    """One LMDB write transaction: its data pages, its fdatasync, its meta page."""
    data: bytearray = field(default_factory=bytearray)
    sync: Call | None = None
    meta: Call | None = None


def transactions(calls: list[Call], data_mdb: str) -> list[Txn]:
    """LMDB serialises writers, so the data.mdb writes between two meta-page
    writes belong to one transaction, whichever thread made them."""
    meta_end = 2 * os.sysconf("SC_PAGE_SIZE")  # meta pages 0 and 1
    txns, cur = [], Txn()
    for c in calls:
        if c.path != data_mdb:
            continue
        if c.name in ("fdatasync", "fsync", "msync"):
            cur.sync = c
        elif c.name == "pwrite64" and _offset(c) < meta_end:
            cur.meta = c
            txns.append(cur)
            cur = Txn()
        elif c.name.startswith(("pwrite", "write")):
            cur.data += c.data
    assert not cur.data, "data.mdb pages written after the last commit"
    return txns


# -- the test ---------------------------------------------------------------------


def _traced_backup(tmp_path, extra_env: dict | None = None):
    strace = _strace()
    store = str(tmp_path / "store")
    # 1 MiB packs: the backup seals several, so checkpoints fall between them.
    ChunkStore.init(store, chunk_size=CS, pack_target_size=1 << 20).close()
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    write_at(img, 0, rng(150).bytes(6 << 20))   # incompressible: about 6 packs
    log = str(tmp_path / "strace.log")
    cmd = [strace, "-f", "-qq", "-y", "-xx", "-s", "8192", "-o", log, "-e", f"trace={CALLS}",
           sys.executable, "-c", CHILD, str(CHECKPOINT_ENTRIES), "backup", store, img, "--disk", "d"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(extra_env or {})))
    assert proc.returncode == 0 and proc.stdout.strip() == "d@1", proc.stderr
    with open(log) as f:
        calls = parse(f.read())
    return store, img, calls


def _durability_violations(store: str, calls: list[Call]) -> tuple[list[str], list[Txn], dict]:
    store = os.path.realpath(store)
    packs_dir = os.path.join(store, "packs")
    pack_calls: dict[bytes, list[Call]] = {}
    dir_syncs: dict[str, list[Call]] = {}
    for c in calls:
        if c.path.startswith(packs_dir + os.sep) and c.path.endswith(".pack"):
            pack_calls.setdefault(bytes.fromhex(os.path.basename(c.path)[:-5]), []).append(c)
        elif os.path.dirname(c.path) == packs_dir and c.name == "fsync":
            dir_syncs.setdefault(c.path, []).append(c)
    txns = transactions(calls, os.path.join(store, "index", "data.mdb"))
    problems: list[str] = []
    for t, txn in enumerate(txns):
        mentioned = [pid for pid in pack_calls if pid in txn.data]
        if not mentioned:
            continue
        if txn.sync is None:
            problems.append(f"transaction {t} (packs {[p.hex()[:8] for p in mentioned]}) has no fdatasync")
            continue
        due = txn.sync.start
        for pid in mentioned:
            name = pid.hex()[:8]
            syncs = [c for c in pack_calls[pid] if c.name == "fsync" and c.end < due]
            writes = [c for c in pack_calls[pid] if c.name.startswith(("pwrite", "write"))]
            if not syncs:
                problems.append(f"transaction {t} syncs before pack {name} was fsynced")
            elif [w for w in writes if w.start > syncs[-1].end]:
                problems.append(f"pack {name} was written after the fsync transaction {t} relies on")
            directory = os.path.dirname(pack_calls[pid][0].path)
            if not [c for c in dir_syncs.get(directory, []) if c.start > pack_calls[pid][0].end and c.end < due]:
                problems.append(f"transaction {t} syncs before directory {directory} of pack {name} was fsynced")
    return problems, txns, pack_calls


def test_every_transaction_syncs_after_the_packs_it_references(tmp_path):
    store, img, calls = _traced_backup(tmp_path)
    problems, txns, pack_calls = _durability_violations(store, calls)
    assert problems == [], "\n".join(problems)

    # What the trace saw is the whole backup: every pack the committed index
    # references was written, and some transaction mentions it; the last
    # transaction is the one that adds the catalog entry.
    with ChunkStore.open(store) as st, st.read_txn() as txn:
        indexed = {IndexEntry.decode(v).pack_id for _, v in txn.cursor(db=st.chunks_db)}
    assert indexed and indexed <= set(pack_calls)
    referencing = [t for t in txns if any(pid in t.data for pid in indexed)]
    assert all(any(pid in t.data for t in referencing) for pid in indexed)
    catalog_entry = re.compile(rb'"kind":\s*"full"')  # the catalog's JSON value of d@1
    assert [t for t in txns if catalog_entry.search(t.data)] == [txns[-1]]
    # Checkpoints: index entries committed before the final commit.
    checkpoints = [t for t in referencing if t is not txns[-1]]
    assert len(checkpoints) >= 2, f"only {len(checkpoints)} checkpoint(s): the test would not see their order"
    # The commit's metadata records (issue 9): in a pack of their own, written only after every
    # chunk pack's fsync returned (metadata that reached the disk never names lost chunks), and
    # synced, with its directory, before the final transaction (the check above), which names it.
    meta_packs = [pid for pid in pack_calls
                  if any(r.header.magic == METADATA_MAGIC for r in scan_pack(os.path.join(store, pack_relpath(pid))).records)]
    assert len(meta_packs) == 1 and meta_packs[0] in txns[-1].data and meta_packs[0] not in indexed
    (meta_pack,) = meta_packs
    first_meta_write = min(c.start for c in pack_calls[meta_pack] if c.name.startswith(("pwrite", "write")))
    chunk_syncs = [c for pid in indexed for c in pack_calls[pid] if c.name == "fsync"]
    assert chunk_syncs and all(c.end < first_meta_write for c in chunk_syncs)
    out = str(tmp_path / "restored.img")
    with Repository.open(store) as repo:
        restore_backup(repo, "d@1", out)
    assert same_file(out, img)


def test_the_checker_sees_a_transaction_that_overtakes_a_pack_sync():
    """The parser and checker themselves, on a hand-written log: a commit whose
    fdatasync starts while the pack's fsync is still running is a violation."""
    store = "/s"
    pid = bytes(range(16))
    pack = f"/s/packs/00/{pid.hex()}.pack"
    page = "".join(f"\\x{b:02x}" for b in b"\0" * 8 + pid)
    log = "\n".join([
        f'7 openat(AT_FDCWD</>, "{pack}", O_WRONLY|O_CREAT) = 8<{pack}>',
        f'7 pwritev2(8<{pack}>, [{{iov_base="\\x01", iov_len=1}}], 1, 0, 0) = 1',
        f"7 fsync(8<{pack}> <unfinished ...>",
        f'9 pwrite64(4</s/index/data.mdb>, "{page}", 24, 8192) = 24',
        "9 fdatasync(4</s/index/data.mdb>) = 0",
        '9 pwrite64(5</s/index/data.mdb>, "\\x00", 1, 32) = 1',
        "7 <... fsync resumed>) = 0",
        "7 fsync(9</s/packs/00>) = 0",
    ])
    problems, txns, _ = _durability_violations(store, parse(log))
    assert len(txns) == 1 and pid in txns[0].data
    assert any("before pack 00010203 was fsynced" in p for p in problems), problems
    assert any("directory /s/packs/00" in p for p in problems), problems
