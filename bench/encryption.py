"""python -m bench --encryption: what encryption at rest costs blockvault, against restic and borg, in one run.

    python -m bench --encryption --out DIR [--quick] [--size 2G] [--allocated 1G] [--rounds 2] [--keep]

First the primitives (bench/crypto_ids.py: chunk-id candidates and the AEADs,
1 and 2 threads).  Then one generated image (bench/workload.py: T1, and T2
with ``--change-share`` of its allocated blocks rewritten) goes, through
each tool's CLI, measured as every bench step is (bench/measure.py), into:

* ``blockvault``: a plaintext store;
* ``blockvault-aes-256-gcm``, ``blockvault-chacha20-poly1305``: encrypted
  stores (``init STORE --encryption C``, the key from a passphrase slot,
  ``BLOCKVAULT_PASSPHRASE`` in the environment of every command);
* ``blockvault-aes-256-gcm-keyfile``: the same cipher with a key-file slot
  (``init --new-key-file F``, then ``BLOCKVAULT_KEY_FILE``), the nightly
  job's way: it shows what a passphrase's argon2id costs every command;
* ``restic`` (always encrypted: AES-256-CTR + Poly1305, ``RESTIC_PASSWORD``);
* ``borg-none`` (``--encryption none``) and ``borg-repokey-blake2``
  (``BORG_PASSPHRASE``), borg's default chunker and compression.

Steps: full backup of T1, incremental backup of T2 (blockvault with the
changed-areas file, the peers read the whole image again, as they must),
``list`` (blockvault only: a command that reads little, so its time beside
the plaintext store's is the cost of opening the key) and a restore of T2,
checked byte for byte against T2's digests.  ``--rounds N`` repeats it all
on fresh repositories, the tools in a rotated order, and the fastest run of
each step counts (other work on a shared machine only ever slows a run).

Reported (results.json, report.md): MB/s per step (the image's apparent
size over wall time, as the main bench's logical MB/s), peak RSS, stored
bytes; blockvault's encrypted over plaintext speed per step (targets, issue
13: full backup >= 0.90, restore >= 0.90); and how much faster blockvault is
than each peer, encrypted against encrypted and plaintext against plaintext
(target: the encrypted margin at least 0.90 of the plaintext one).
``--quick`` is small, for CI: every step ran, every restore identical, never
a verdict on speed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import time

from bench import crypto_ids
from bench.blockvault_runner import Blockvault
from bench.encryption_report import STEPS, markdown, summarise
from bench.measure import ToolRunner, fresh_dirs, log, rss_floor, run_measured
from bench.peers import Borg, Restic
from bench.units import chunk_label, format_size, parse_size
from bench.workload import Workload, WorkloadConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSPHRASE = "blockvault-bench passphrase"  # a fixed test value, not a secret
CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
KEY_ENV = ("BLOCKVAULT_PASSPHRASE", "BLOCKVAULT_KEY_FILE", "BLOCKVAULT_DST_PASSPHRASE", "BLOCKVAULT_DST_KEY_FILE")
FULL = {"size": "2G", "allocated": "1G", "rounds": 2}
QUICK = {"size": "64M", "allocated": "16M", "rounds": 1}


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any blockvault key source, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in KEY_ENV}
    env.update(extra)
    return env


class _TwoNights:
    """Night 1 is a full backup, night 2 an incremental from the changed areas;
    after init, what the store's config.json says it is (so a store that
    ignored ``--encryption`` is caught, not measured as an encrypted one)."""

    def backup_mode(self, night: int, last_night: int) -> str:
        return "full" if night == 1 else "incremental"

    def init(self):
        rec = super().init()
        try:
            with open(os.path.join(self.repo, "config.json")) as f:
                cfg = json.load(f)
            self.info["store_config"] = {k: cfg.get(k) for k in ("version", "digest", "encryption", "chunk_size")}
        except (OSError, ValueError) as e:
            self.info["store_config"] = {"error": str(e)}
        return rec


class PlainBlockvault(_TwoNights, Blockvault):
    cipher = None
    key_source = None

    def __init__(self, root: str, chunk_size: int, **kw):
        super().__init__(root, chunk_size, env=_clean_env(**kw.pop("extra_env", {})), **kw)
        self.name = "blockvault"
        self.info.update(encryption=None, key_source=None)


class EncryptedBlockvault(_TwoNights, Blockvault):
    """``init --encryption CIPHER``; the key from a passphrase or a key-file slot."""

    def __init__(self, root: str, chunk_size: int, cipher: str, key_source: str = "passphrase", **kw):
        extra = kw.pop("extra_env", {})
        self.key_file = os.path.join(root, "store.key")
        self.key_source = key_source
        self.cipher = cipher
        source = ({"BLOCKVAULT_PASSPHRASE": PASSPHRASE} if key_source == "passphrase"
                  else {"BLOCKVAULT_KEY_FILE": self.key_file})
        super().__init__(root, chunk_size, env=_clean_env(**extra, **source), **kw)
        self.name = f"blockvault-{cipher}" + ("-keyfile" if key_source == "key-file" else "")
        self.info.update(encryption=cipher, key_source=key_source)

    def _init(self):
        args = ["init", self.repo, "--chunk-size", chunk_label(self.chunk_size), "--encryption", self.cipher]
        if self.compression_level is not None:
            args += ["--compression-level", str(self.compression_level)]
        env = self.env
        if self.key_source == "key-file":  # a key-file slot only: no passphrase anywhere
            args += ["--new-key-file", self.key_file]
            env = {k: v for k, v in self.env.items() if k != "BLOCKVAULT_KEY_FILE"}
        return run_measured([self._cli(*args)], timeout=self.timeout, env=env)


class ResticEnc(Restic):
    """restic as the main bench runs it (it cannot store unencrypted), two nights."""
    encryption = "aes-256-ctr+poly1305"

    def env(self) -> dict[str, str]:
        return {k: v for k, v in super().env().items() if k not in KEY_ENV}


class BorgNone(Borg):
    name = "borg-none"
    encryption = None


class BorgBlake2(Borg):
    """borg 1.2 ``repokey-blake2``: AES-256-CTR + keyed BLAKE2b MAC and ids."""

    name = "borg-repokey-blake2"
    encryption = "repokey-blake2"
    passphrase = "blockvault-bench"  # not a secret

    def env(self) -> dict[str, str]:
        env = super().env()
        env["BORG_PASSPHRASE"] = self.passphrase
        return env

    def _init(self):
        return run_measured([["borg", "init", "--encryption", "repokey-blake2", self.repo]], env=self.env(),
                            timeout=self.timeout)


PEER_NAMES = ("restic", "borg")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --encryption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and report.md")
    p.add_argument("--quick", action="store_true", help="small image, one round, correctness only (CI)")
    p.add_argument("--size", help=f"apparent size of the image (default {FULL['size']}, quick {QUICK['size']})")
    p.add_argument("--allocated", help=f"bytes written in T1, at most half the size (default {FULL['allocated']})")
    p.add_argument("--change-share", type=float, default=0.03, help="share of allocated blocks rewritten for T2 (0.03)")
    p.add_argument("--chunk-size", default="256K", help="blockvault chunk size (default 256K, the store default)")
    p.add_argument("--ciphers", default=",".join(CIPHERS), help="encrypted blockvault stores (default: both)")
    p.add_argument("--no-key-file", action="store_true", help="skip the key-file variant")
    p.add_argument("--peers", default=",".join(PEER_NAMES), help="restic,borg, a subset, or none")
    p.add_argument("--rounds", type=int, help="repeat on fresh repositories, fastest counts (default 2, quick 1)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    p.add_argument("--no-ids", action="store_true", help="skip the primitives' table")
    p.add_argument("--blockvault", default=None,
                   help="command that runs the blockvault CLI (default: this Python -m engine.cli of this tree)")
    p.add_argument("--work", help="image and repositories (default OUT/work)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeout", type=float, help="seconds before one step is killed (quick 300, else 3600)")
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.timeout = a.timeout or (300.0 if a.quick else 3600.0)
    a.cipher_list = [c.strip() for c in a.ciphers.split(",") if c.strip()]
    a.peer_list = [] if a.peers in ("", "none") else [s.strip() for s in a.peers.split(",") if s.strip()]
    bad = [c for c in a.cipher_list if c not in CIPHERS] + [n for n in a.peer_list if n not in PEER_NAMES]
    if bad:
        p.error(f"unknown: {', '.join(bad)} (ciphers: {', '.join(CIPHERS)}; peers: {', '.join(PEER_NAMES)})")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        a.size_b, a.allocated_b, a.chunk_b = parse_size(a.size), parse_size(a.allocated), parse_size(a.chunk_size)
    except ValueError as e:
        p.error(str(e))
    a.command = a.blockvault.split() if a.blockvault else [sys.executable, "-m", "engine.cli"]
    return a


def make_tools(args, root: str) -> list[ToolRunner]:
    # the tree's code, wherever the command runs from
    extra = {} if args.blockvault else {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kw = dict(command=args.command, timeout=args.timeout, extra_env=extra)
    tools: list[ToolRunner] = [PlainBlockvault(os.path.join(root, "blockvault"), args.chunk_b, **kw)]
    for c in args.cipher_list:
        tools.append(EncryptedBlockvault(os.path.join(root, f"blockvault-{c}"), args.chunk_b, c, **kw))
    if args.cipher_list and not args.no_key_file:
        c = args.cipher_list[0]
        tools.append(EncryptedBlockvault(os.path.join(root, f"blockvault-{c}-keyfile"), args.chunk_b, c,
                                         key_source="key-file", **kw))
    if "restic" in args.peer_list:
        tools.append(ResticEnc(os.path.join(root, "restic"), timeout=args.timeout))
    if "borg" in args.peer_list:
        tools.append(BorgNone(os.path.join(root, "borg-none"), timeout=args.timeout))
        tools.append(BorgBlake2(os.path.join(root, "borg-repokey-blake2"), timeout=args.timeout))
    return tools


def _said(rec) -> str:
    if not rec.ok:
        return f"FAILED: {rec.error}"
    tail = ", identical" if rec.identical else ""
    return (f"{rec.wall_s:.2f}s, {rec.logical_MBps or 0:.0f} MB/s, peak RSS "
            f"{format_size(rec.peak_rss_bytes)}{tail}")


def one_round(args, work: str, rnd: int, t0: float) -> tuple[list[ToolRunner], list[dict]]:
    """Fresh repositories, T1 full, T2 incremental, list, restore of T2."""
    from bench.__main__ import warm

    root = os.path.join(work, f"round{rnd}")
    shutil.rmtree(root, ignore_errors=True)
    tools = make_tools(args, root)
    k = (rnd - 1) % len(tools)
    order = tools[k:] + tools[:k]  # each round starts with another tool
    image = os.path.join(root, "disk.img")
    cfg = WorkloadConfig(size=args.size_b, allocated=args.allocated_b, seed=args.seed,
                         change_share=args.change_share, grow_every=0)
    nights = []
    with Workload(image, os.path.join(root, "cbt"), cfg) as wl:
        for tool in order:
            rec = tool.init()
            log(t0, f"round {rnd} {tool.name} init: {'ok' if rec.ok else 'FAILED: ' + str(rec.error)}")
        for n in (1, 2):
            night = wl.create() if n == 1 else wl.advance()
            nights.append(night.summary())
            log(t0, f"round {rnd} T{n}: {format_size(night.size)} apparent, "
                    f"{format_size(night.scan.allocated_bytes)} allocated, {format_size(night.changed_bytes)} changed")
            for tool in order:
                warm(image)
                rec = tool.backup(night, image, 2)
                log(t0, f"round {rnd} {tool.name} {'full' if n == 1 else 'incremental'}: {_said(rec)}")
        for tool in order:
            if isinstance(tool, Blockvault):
                rec = tool.list_backups()
                log(t0, f"round {rnd} {tool.name} list: {_said(rec)}")
        for tool in order:
            rec = tool.restore(wl.nights[-1], os.path.join(root, "restore", tool.name))
            log(t0, f"round {rnd} {tool.name} restore T2: {_said(rec)}")
    for tool in tools:
        for rec in tool.steps:
            rec.extra["round"] = rnd
            rec.extra["step_name"] = step_name(rec)
    return tools, nights


def step_name(rec) -> str:
    if rec.step == "backup":
        return "full" if rec.night == 1 else "incremental"
    return rec.step


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import filesystem_of, library_versions, machine, repo_commit
    from bench.lifecycle import compile_tree

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.blockvault is None:
        compile_tree()
    t0 = time.perf_counter()
    out, work = fresh_dirs(args.out, args.work)
    doc: dict = {
        "schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench", "--encryption", *argv], "quick": args.quick,
        "config": {"size_bytes": args.size_b, "allocated_bytes": args.allocated_b,
                   "change_share": args.change_share, "chunk_size": args.chunk_b, "ciphers": args.cipher_list,
                   "key_file_variant": bool(args.cipher_list) and not args.no_key_file, "peers": args.peer_list,
                   "rounds": args.rounds, "seed": args.seed, "blockvault_command": args.command,
                   "work_filesystem": filesystem_of(work), "rss_floor_bytes": rss_floor()},
        "machine": machine(), "versions": {}, "nights": [], "tools": {}, "checks": [], "ok": False,
    }
    doc["machine"]["loadavg_start"] = list(os.getloadavg())
    if not args.no_ids:
        log(t0, "primitives (bench/crypto_ids.py) ...")
        doc["crypto_ids"] = (crypto_ids.measure(seconds=0.05, pool=8 << 20, rounds=1, probe_seconds=0.3, probes=1)
                             if args.quick else crypto_ids.measure())
        print(crypto_ids.table(doc["crypto_ids"]), file=sys.stderr, flush=True)
    try:
        for rnd in range(1, args.rounds + 1):
            tools, nights = one_round(args, work, rnd, t0)
            doc["nights"] = nights
            for tool in tools:
                entry = doc["tools"].setdefault(tool.name, {
                    "kind": tool.kind, "version": tool.version(), "info": tool.info,
                    "encryption": getattr(tool, "cipher", None) if tool.kind == "blockvault"
                    else getattr(tool, "encryption", None),
                    "key_source": getattr(tool, "key_source", None), "steps": []})
                entry["steps"] += [s.as_dict() for s in tool.steps]
                doc["versions"][tool.name] = entry["version"]
            if not args.keep:
                shutil.rmtree(os.path.join(work, f"round{rnd}"), ignore_errors=True)
    finally:
        doc["machine"]["loadavg_end"] = list(os.getloadavg())
        doc["versions"]["blockvault_commit"] = repo_commit()
        doc["versions"].update(library_versions())
        doc["versions"].update((crypto_ids.versions()))
        summarise(doc)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(doc, f, indent=1, default=float)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(markdown(doc))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc, brief=True))
    for c in doc["checks"]:
        if not c["ok"]:
            log(t0, f"CHECK FAILED: {c['name']}: {c['detail']}")
    log(t0, f"{'ok' if doc['ok'] else 'FAILED'}: {sum(c['ok'] for c in doc['checks'])} of {len(doc['checks'])} "
            f"checks passed; results in {out}")
    return 0 if doc["ok"] else 1


__all__ = ["main", "STEPS"]

if __name__ == "__main__":
    sys.exit(main())
