"""What a person (or cron's mail) sees on stderr (issue 8, items 10 and 11).

A one-line summary of every backup, restore and verify on stderr whatever
stdout is; ``--quiet`` silences it, ``-v`` adds detail, ``--log-file`` keeps
the same lines with timestamps.  ``--version``; ``--wait`` says whom it waits
for and its timeout does not advise passing ``--wait``; on a terminal the
progress line fits the terminal's width and shows a syncing stage.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import tomllib

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, text_bytes, write_at

CS = 64 << 10


@pytest.fixture
def setup(tmp_path):
    store, img = str(tmp_path / "store"), str(tmp_path / "d.img")
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    make_sparse(img, 40 * CS)
    write_at(img, CS, text_bytes(rng(3), 6 * CS))
    write_at(img, 20 * CS, rng(4).bytes(3 * CS))
    return store, img


SUMMARY = {
    "backup": re.compile(r"^blockvault: backup d@1 full: read 576\.0 KiB, stored [0-9.]+ (B|KiB|MiB) "
                         r"\(\d+ new chunks?\), 0 warnings, [0-9.]+ s$"),
    "restore": re.compile(r"^blockvault: restore d@1 to .*/r\.img: 2\.5 MiB disk, wrote 576\.0 KiB of data, "
                          r"[0-9.]+ s$"),
    "verify": re.compile(r"^blockvault: verify .*/store: OK; \d+ chunks \([0-9.]+ [KM]iB\) and 2 backups checked, "
                         r"[0-9.]+ s$"),
}


def test_one_summary_line_on_stderr_whatever_stdout_is(setup, tmp_path):
    store, img = setup
    out = str(tmp_path / "r.img")
    for args in (["backup", store, img, "--disk", "d"], ["restore", store, "d@1", out], ["verify", store]):
        for json_flag in ([], ["--json"]):
            if args[0] == "backup" and json_flag:
                args = ["backup", store, img, "--disk", "d2"]
            if args[0] == "restore" and json_flag:
                os.unlink(out)
            proc = run_cli(*args, *json_flag)
            assert proc.returncode == 0, proc.stderr
            lines = proc.stderr.splitlines()
            assert len(lines) == 1, proc.stderr
            pattern = SUMMARY[args[0]]
            if args[0] == "backup" and json_flag:
                pattern = re.compile(pattern.pattern.replace("d@1", "d2@1"))
            assert pattern.match(lines[0]), lines[0]
            if json_flag:
                assert json.loads(proc.stdout)["ok"] is True
    assert same_file(out, img)
    # stdout keeps data only: the backup's id, nothing for a restore
    again = run_cli("backup", store, img, "--disk", "d")
    assert again.stdout == "d@2\n"
    out2 = str(tmp_path / "r2.img")
    assert run_cli("restore", store, "d@2", out2).stdout == ""


def test_quiet_silences_the_summary_and_verbose_adds_detail(setup, tmp_path):
    store, img = setup
    quiet = run_cli("backup", store, img, "--disk", "d", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == "d@1\n"
    # -q before the command name too
    quiet = run_cli("-q", "verify", store)
    assert quiet.returncode == 0 and quiet.stderr == "" and "store OK" in quiet.stdout
    # ...but errors still reach stderr
    err = run_cli("restore", store, "d@9", str(tmp_path / "x.img"), "-q")
    assert err.returncode == 1 and err.stderr.startswith("blockvault: error: no backup d@9")

    verbose = run_cli("backup", store, img, "--disk", "d", "--mode", "incremental", "-v")
    lines = verbose.stderr.splitlines()
    assert verbose.returncode == 0 and lines[0].startswith("blockvault: backup d@2 incremental: read ")
    assert any(f"source {img}, base d@1" in line for line in lines[1:]), lines
    assert any(re.search(r"\d+ chunks read: 0 new, \d+ deduplicated, \d+ zero", line) for line in lines[1:]), lines


def test_log_file_appends_the_same_lines_with_timestamps(setup, tmp_path):
    store, img = setup
    log = tmp_path / "bv.log"
    first = run_cli("backup", store, img, "--disk", "d", "--log-file", str(log))
    second = run_cli("--log-file", str(log), "-q", "backup", store, img, "--disk", "d", "--mode", "incremental")
    failed = run_cli("restore", store, "d@9", str(tmp_path / "x.img"), "--log-file", str(log))
    assert first.returncode == 0 and second.returncode == 0 and failed.returncode == 1
    assert second.stderr == ""  # quiet on stderr, yet the summary is in the log
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    stamp = re.compile(r"^(\S+) \[(\d+)\] (.*)$")
    texts = []
    for line in lines:
        m = stamp.match(line)
        assert m, line
        when = datetime.datetime.fromisoformat(m.group(1))
        assert when.tzinfo is not None and abs(when.timestamp() - time.time()) < 300
        texts.append(m.group(3))
    assert f"blockvault: {texts[0]}\n" == first.stderr
    assert texts[1].startswith("backup d@2 incremental: read ")
    assert f"blockvault: {texts[2]}\n" == failed.stderr and texts[2].startswith("error: no backup d@9")


def test_version():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"blockvault {version}\n"


def _hold(store: str, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from chunkstore import ChunkStore; s = ChunkStore.open(sys.argv[1]); "
         "w = s.writer(purpose='nightly job', chains=[('disk', 'd')]); print('held', flush=True); "
         "time.sleep(float(sys.argv[2])); "
         "w.abort()", store, str(seconds)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_wait_names_whom_it_waits_for_and_its_timeout_does_not_advise_wait(setup):
    store, img = setup
    holder = _hold(store, 60)
    try:
        proc = run_cli("backup", store, img, "--disk", "d", "--wait", "1.5")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 4
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    who = f"nightly job by pid {holder.pid} on {os.uname().nodename} since "
    busy = f"disk d is busy in store {store}: another backup of it is running ({who}"
    assert lines[0].startswith(f"blockvault: {busy}")
    assert lines[0].endswith("); waiting up to 1.5 s for it")
    assert lines[1].startswith(f"blockvault: error: {busy}")
    assert "waited 1.5 s" in lines[1] and "--wait" not in lines[1]
    # the holder's start time is ISO 8601 with an offset
    since = re.search(r"since (\S+)\)", lines[1]).group(1)
    assert datetime.datetime.fromisoformat(since).tzinfo is not None
    # Without --wait the advice to pass it stays.
    holder = _hold(store, 60)
    try:
        now = run_cli("backup", store, img, "--disk", "d")
    finally:
        holder.kill()
        holder.wait()
    assert now.returncode == 4 and "pass --wait SECONDS" in now.stderr and "waiting" not in now.stderr


def test_wait_succeeds_once_the_holder_is_done(setup, tmp_path):
    store, img = setup
    holder = _hold(store, 1.5)
    try:
        proc = run_cli("backup", store, img, "--disk", "d", "--wait", "30")
    finally:
        holder.wait()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "another backup of it is running (nightly job" in lines[0] and lines[1].startswith("blockvault: backup d@1 full")
    out = str(tmp_path / "r.img")
    assert run_cli("restore", store, "d@1", out).returncode == 0 and same_file(out, img)


def _on_terminal(args: list[str], columns: int) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode()
    proc.wait()
    return proc.returncode, out, b"".join(chunks).decode()


def test_progress_fits_the_terminal_and_shows_syncing(setup, tmp_path):
    store, img = setup
    # A longer disk name than the terminal is wide.
    disk = "a-disk-name-longer-than-the-terminal-is-wide"
    code, out, tty = _on_terminal(["backup", store, img, "--disk", disk], 64)
    assert code == 0 and out == f"{disk}@1\n", tty
    screen = tty.replace("\r\n", "\n")
    pieces = [p for line in screen.split("\n") for p in line.split("\r")]
    progress = [p for p in pieces if p.startswith("backup a-disk")]
    assert progress and all(len(p) <= 63 for p in progress), progress
    assert any(p.startswith("backup a-disk-name") and "…: 576.0 KiB read in 0:00:00, syncing 0:00:0" in p
               for p in progress), progress
    assert progress[-1].rstrip().endswith(": 576.0 KiB in 0:00:00, done"), progress
    # The summary starts a line of its own, after the finished progress line.
    summary = [line for line in screen.split("\n") if "blockvault: backup" in line]
    assert len(summary) == 1 and summary[0].startswith("blockvault: backup"), screen
