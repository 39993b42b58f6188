"""blockvault serve: a point as an NBD export, read by real clients (nbdcopy,
qemu-img, nbdinfo, qemu-io) and compared with what `restore` writes."""

from __future__ import annotations

import glob
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import jsonshape
from helpers import (REPO_ROOT, foreground, make_sparse, rng, run_cli, same_file, store_fingerprint, text_bytes,
                     write_at)

CS = 64 << 10
TOOLS = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io")
pytestmark = pytest.mark.skipif(
    any(subprocess.run(["sh", "-c", f"command -v {t}"], capture_output=True, timeout=30).returncode for t in TOOLS),
    reason="needs nbdkit, nbdkit-plugin-python, libnbd-bin, qemu-utils (tools/install.sh --test)")
SECTIONS, _ = jsonshape.parse()


@pytest.fixture(scope="module")
def point(tmp_path_factory):
    """(store, {id: restored image}) for d@1 and its incremental d@2: a sparse
    image of 70 MiB + 333 B (two segments) with text, random data, a chunk
    stored once for two offsets, written zeros and a partial last chunk."""
    d = tmp_path_factory.mktemp("serve")
    store, img = str(d / "store"), str(d / "src.img")
    r = rng(7)
    size = (70 << 20) + 333
    make_sparse(img, size)
    for k in range(0, 200, 3):
        write_at(img, k * CS + (k % 4) * 999, text_bytes(r, 25_000 + k * 41))
    write_at(img, 20 << 20, r.bytes(2 << 20))
    same = r.bytes(CS)
    write_at(img, 500 * CS, same)
    write_at(img, 700 * CS, same)
    write_at(img, 40 << 20, bytes(CS))             # written zeros: a zero chunk all the same
    write_at(img, (64 << 20) - 7, r.bytes(40))      # across the segment boundary
    write_at(img, size - 333, r.bytes(333))
    assert run_cli("init", store, "--chunk-size", "64K").returncode == 0
    assert run_cli("backup", store, img, "--disk", "d").returncode == 0
    write_at(img, 5 * CS + 3, r.bytes(2 * CS))
    assert run_cli("backup", store, img, "--disk", "d", "--mode", "incremental").returncode == 0
    restored = {}
    for ref in ("d@1", "d@2"):
        out = str(d / f"restored-{ref}.img")
        proc = run_cli("restore", store, ref, out)
        assert proc.returncode == 0, proc.stderr
        restored[ref] = out
    return store, restored


def chunks_of(path: str):
    with open(path, "rb") as f:
        while True:
            c = f.read(CS)
            if not c:
                return
            yield c


def zero_runs(path: str) -> list[tuple[int, int, bool]]:
    """(offset, length, zero) runs of whole chunks, as the manifest has them."""
    size = os.path.getsize(path)
    out: list[list] = []
    for i, c in enumerate(chunks_of(path)):
        zero = not any(c)
        if out and out[-1][2] == zero:
            out[-1][1] += len(c)
        else:
            out.append([i * CS, len(c), zero])
    assert sum(e[1] for e in out) == size
    return [tuple(e) for e in out]


def serve_json(*args, timeout: float = 300) -> tuple[dict, subprocess.CompletedProcess]:
    proc = run_cli("serve", *args, "--json", timeout=timeout)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout), proc


def assert_shape(doc: dict, section: str) -> None:
    problems = jsonshape.check(doc, section, SECTIONS)
    assert not problems, "\n".join(problems)


def test_nbdcopy_and_qemu_img_convert_give_the_restored_image(point, tmp_path):
    store, restored = point
    a, b = tmp_path / "nbdcopy.img", tmp_path / "qemu.img"
    doc, proc = serve_json(store, "d@latest", "--run",
                           f'nbdcopy "$uri" {a} && qemu-img convert -f raw -O raw "$uri" {b}')
    assert_shape(doc, "serve")
    assert doc["id"] == "d@2" and doc["run"]["exit_code"] == 0 and doc["writable"] is False
    assert same_file(str(a), restored["d@2"])
    # qemu-img writes whole 512-byte sectors: the disk's odd tail is padded with zeros
    size = os.path.getsize(restored["d@2"])
    assert os.path.getsize(b) == -(-size // 512) * 512
    with open(b, "rb") as f, open(restored["d@2"], "rb") as t:
        assert f.read(size) == t.read() and not any(f.read())
    # Every distinct data chunk read exactly once for both clients: zero chunks
    # never, the chunk at two offsets once, the second client from the cache.
    distinct = {c for c in chunks_of(restored["d@2"]) if any(c)}
    assert doc["stats"]["chunks_read"] == len(distinct)
    assert doc["stats"]["cache_hits"] > 0


def test_nbdinfo_map_is_the_manifests_zero_chunks(point):
    store, restored = point
    proc = run_cli("serve", store, "d@1", "--run", 'nbdinfo --map "$uri" && nbdinfo "$uri"')
    assert proc.returncode == 0, proc.stderr
    runs, info = [], {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            runs.append((int(parts[0]), int(parts[1]), int(parts[2])))
        elif ":" in line:
            key, _, value = line.strip().partition(": ")
            info[key] = value
    assert [(o, n, t == 3) for o, n, t in runs] == zero_runs(restored["d@1"])
    assert {t for _, _, t in runs} == {0, 3}
    assert info["block_size_preferred"] == str(CS)
    assert info["can_multi_conn"] == "true" and info["is_read_only"] == "true"
    assert info["export-size"].split()[0] == str(os.path.getsize(restored["d@1"]))


def test_writable_writes_read_back_and_the_store_is_unchanged(point, tmp_path):
    store, restored = point
    before = store_fingerprint(store)
    out = tmp_path / "after-writes.img"
    script = ('qemu-io -f raw -c "write -P 0xab 0 65536" -c "write -P 0xcd 1000001 4095" "$uri" >&2 && '
              f'nbdcopy "$uri" {out}')
    doc, _ = serve_json(store, "d@2", "--writable", "--run", script)
    assert doc["writable"] is True and doc["run"]["exit_code"] == 0
    with open(restored["d@2"], "rb") as f:
        expected = bytearray(f.read())
    expected[0:65536] = b"\xab" * 65536
    expected[1000001:1000001 + 4095] = b"\xcd" * 4095
    with open(out, "rb") as f:
        assert f.read() == bytes(expected)
    assert store_fingerprint(store) == before
    # and a new server sees the point as it was: the overlay died with the last one
    again = tmp_path / "again.img"
    serve_json(store, "d@2", "--run", f'nbdcopy "$uri" {again}')
    assert same_file(str(again), restored["d@2"])


def test_read_only_export_refuses_writes(point):
    store, _ = point
    before = store_fingerprint(store)
    proc = run_cli("serve", store, "d@1", "--run", 'qemu-io -f raw -c "write -P 0xab 0 4096" "$uri"')
    assert proc.returncode != 0
    assert "read-only" in (proc.stdout + proc.stderr).lower() or "permission" in (proc.stdout + proc.stderr).lower()
    assert store_fingerprint(store) == before


def _start_server(*args, ignore=()) -> tuple[subprocess.Popen, dict]:
    """A long-running `blockvault serve ... --json` and its announcement (read with a deadline),
    started as from a terminal (helpers.foreground), with the signals ``ignore`` ignored."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", *args, "--json"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: foreground(*ignore))
    got = b""
    deadline = time.monotonic() + 120
    while not got.endswith(b"\n}\n") and time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        piece = os.read(proc.stdout.fileno(), 65536)
        if not piece:
            break
        got += piece
    if got.endswith(b"\n}\n"):
        return proc, json.loads(got)
    proc.kill()
    out, err = proc.communicate(timeout=30)
    raise AssertionError(f"serve did not announce its export: {got + out!r} {err!r}")


def _stop(proc: subprocess.Popen, *signums: int, timeout: float = 60) -> str:
    """Send ``signums`` to a server from _start_server and wait for it; its stderr.
    One that does not stop is made to print its stacks (SIGUSR1), killed, and the
    test fails with them: a hung server must not stay registered for the next test."""
    for signum in signums:
        proc.send_signal(signum)
    try:
        return proc.communicate(timeout=timeout)[1].decode()
    except subprocess.TimeoutExpired:
        with open(f"/proc/{proc.pid}/status") as f:
            ignored = [line for line in f if line.startswith("SigIgn")]
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"serve did not exit within {timeout} s of {', '.join(signal.Signals(s).name for s in signums)} "
                    f"({''.join(ignored).strip()}); its stderr:\n{err.decode()}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_long_running_server_on_a_socket_stops_cleanly(point, tmp_path):
    store, restored = point
    sock = str(tmp_path / "d1.sock")
    proc, doc = _start_server(store, "d@1", "--socket", sock)
    try:
        assert_shape(doc, "serve")
        assert doc["socket"] == sock and doc["uri"] == f"nbd+unix:///?socket={sock}" and "run" not in doc
        out = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", doc["uri"], str(out)], check=True, timeout=120)
        assert same_file(str(out), restored["d@1"])
    finally:
        err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err and "chunks read" in err
    assert _gone(doc["pid"]) and not os.path.exists(sock)


def test_a_killed_server_leaves_nothing_that_blocks_the_next(point, tmp_path):
    store, restored = point
    sock = str(tmp_path / "k.sock")
    proc, doc = _start_server(store, "d@1", "--socket", sock)
    os.kill(doc["pid"], signal.SIGKILL)              # nbdkit dies: serve says so and cleans up
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "killed by SIGKILL" in err.decode()
    assert not os.path.exists(sock)
    proc, doc = _start_server(store, "d@1", "--socket", sock)
    os.kill(proc.pid, signal.SIGKILL)                # blockvault serve dies: nbdkit follows it,
    proc.communicate(timeout=60)                     # and nobody removes the socket file
    assert _gone(doc["pid"]) and os.path.exists(sock)
    left = [d for d in glob.glob(os.path.join(tempfile.gettempdir(), "blockvault-serve-*"))
            if _read(os.path.join(d, "nbdkit.pid")) == str(doc["pid"])]
    assert len(left) == 1                            # nor its temporary directory
    out = tmp_path / "third.img"
    doc, _ = serve_json(store, "d@1", "--socket", sock, "--run", f'nbdcopy "$uri" {out}')
    assert same_file(str(out), restored["d@1"])
    assert not os.path.exists(left[0])               # the next server removed both


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def test_a_live_socket_is_busy_and_a_file_is_not_a_socket(point, tmp_path):
    store, _ = point
    sock = str(tmp_path / "live.sock")
    proc, doc = _start_server(store, "d@1", "--socket", sock)
    try:
        busy = run_cli("serve", store, "d@1", "--socket", sock, "--json")
        assert busy.returncode == 4 and json.loads(busy.stdout)["error"]["code"] == "busy"
        assert "another server is listening" in busy.stderr
        plain = tmp_path / "plain"
        plain.write_bytes(b"keep me")
        bad = run_cli("serve", store, "d@1", "--socket", str(plain))
        assert bad.returncode == 1 and "not a socket" in bad.stderr and plain.read_bytes() == b"keep me"
    finally:
        err = _stop(proc, signal.SIGINT)
    assert proc.returncode == 0 and "stopped by SIGINT" in err, err


def test_ctrl_c_stops_a_server_though_the_test_run_ignores_sigint(point, tmp_path):
    """A test run started with '&' from a script inherits SIGINT ignored: its
    servers are still started as from a terminal, so SIGINT stops them (it hung
    for ever, and stayed a registered reader for the next test).  SIGUSR1 on
    the way prints where serve is, and serving goes on."""
    store, _ = point
    sock = str(tmp_path / "bg.sock")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)   # as in a backgrounded test run
    try:
        proc, doc = _start_server(store, "d@1", "--socket", sock)
    finally:
        signal.signal(signal.SIGINT, before)
    err = _stop(proc, signal.SIGUSR1, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "stop with Ctrl-C or SIGTERM" in err and "ignored" not in err
    assert "stopped by SIGINT" in err and "in cmd_serve" in err       # faulthandler's dump of the main thread
    assert _gone(doc["pid"]) and not os.path.exists(sock)


def test_a_server_that_inherits_sigint_ignored_says_sigterm_stops_it(point, tmp_path):
    """Started by a script with '&' (SIGINT ignored), serve keeps SIGINT ignored
    (engine/signals.py) and says so, naming the signal that does stop it."""
    store, _ = point
    sock = str(tmp_path / "ign.sock")
    proc, doc = _start_server(store, "d@1", "--socket", sock, ignore=(signal.SIGINT,))
    err = _stop(proc, signal.SIGINT, signal.SIGTERM)   # the SIGINT is discarded when sent
    assert proc.returncode == 0, err
    assert "stop with SIGTERM (SIGINT is ignored: ignored when blockvault started" in err
    assert "Ctrl-C" not in err and "stopped by SIGTERM" in err
    assert _gone(doc["pid"]) and not os.path.exists(sock)


def _free_port() -> int:
    """A free port below the ephemeral range (32768+), so that no outgoing
    connection of another process takes it between the test's steps."""
    import random
    for port in random.sample(range(20000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-30000")


def test_tcp_port_on_loopback_and_a_loud_listen(point):
    store, restored = point
    port = _free_port()
    proc = run_cli("serve", store, "d@1", "--port", str(port), "--run", 'nbdinfo --size "$uri"', "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])       # the command's output comes first
    assert doc["uri"] == f"nbd://127.0.0.1:{port}/" and doc["address"] == "127.0.0.1" and doc["port"] == port
    assert proc.stdout.split("{")[0].strip() == str(os.path.getsize(restored["d@1"]))
    assert "WARNING" not in proc.stderr
    proc = run_cli("serve", store, "d@1", "--listen", "0.0.0.0", "--port", str(port), "--run", "true")
    assert proc.returncode == 0 and "WARNING" in proc.stderr and "NETWORK" in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        busy = run_cli("serve", store, "d@1", "--port", str(port), "--run", "true")
    assert busy.returncode == 4 and f"port {port}" in busy.stderr


def test_run_exits_with_the_commands_status(point):
    store, _ = point
    proc = run_cli("serve", store, "d@1", "--run", 'test -n "$uri" && exit 7')
    assert proc.returncode == 7


def test_bad_requests_are_clear_and_start_nothing(point, tmp_path):
    store, _ = point
    proc = run_cli("serve", store, "d@9", "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "not_found"
    assert "no backup d@9" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("serve", str(tmp_path / "nowhere"), "d@1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    proc = run_cli("serve", store, "d@1", "--socket", "x.sock", "--port", "5000")
    assert proc.returncode == 2
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    proc = run_cli("serve", store, "d@1", "--socket", str(long_dir / "s.sock"))
    assert proc.returncode == 1 and "a Unix socket's may be 107" in proc.stderr
    # nbdkit missing: the Debian package is named (PATH without /usr/bin)
    env = dict(os.environ, PATH=str(tmp_path))
    proc = run_cli("serve", store, "d@1", "--json", env=env)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["error"]["code"] == "tool_missing"
    assert "nbdkit" in doc["error"]["message"] and "apt-get install nbdkit nbdkit-plugin-python" in proc.stderr


def test_the_server_is_a_registered_reader_for_its_lifetime(point, tmp_path):
    """A gc sees a live "serve" reader (chunkstore/registry.py) while the
    export runs, and none after."""
    from chunkstore import registry
    store, _ = point
    proc, doc = _start_server(store, "d@1", "--socket", str(tmp_path / "r.sock"))
    try:
        live = [e for e in registry.PathRegistry(store).live() if e.kind == "serve"]
        assert len(live) == 1 and live[0].pid == doc["pid"]
    finally:
        _stop(proc, signal.SIGTERM)
    assert not [e for e in registry.PathRegistry(store).live() if e.kind == "serve"]


def test_a_damaged_chunk_is_an_io_error_for_the_client_and_the_server_goes_on(point, tmp_path):
    from helpers import chunk_packs
    store = str(tmp_path / "damaged-store")
    shutil.copytree(point[0], store)
    pack = max(chunk_packs(store), key=os.path.getsize)
    with open(pack, "r+b") as f:                       # one byte inside a record's payload
        f.seek(os.path.getsize(pack) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    before = store_fingerprint(store)
    out = tmp_path / "out.img"
    proc = run_cli("serve", store, "d@1", "--json", "--run",
                   f'timeout 60 nbdcopy "$uri" {out} >&2; echo "copy=$?" >&2; timeout 60 nbdinfo --size "$uri" >&2',
                   timeout=180)
    assert proc.returncode == 0, proc.stderr                     # the server answered after the error
    doc = json.loads(proc.stdout)
    assert "copy=0" not in proc.stderr and "Input/output error" in proc.stderr
    assert "blockvault verify" in proc.stderr and "READ ERROR" in proc.stderr
    assert doc["stats"]["read_errors"] >= 1
    assert store_fingerprint(store) == before


def test_clients_killed_mid_transfer_do_not_take_the_export_down(point, tmp_path):
    """A VM or a copy killed while its reads are in flight leaves the server up
    for everyone else (nbdkit 1.32 aborts on this with the PARALLEL model)."""
    store, restored = point
    sock = str(tmp_path / "kill.sock")
    proc, doc = _start_server(store, "d@2", "--socket", sock, "--cache", "0")
    try:
        for k in range(6):
            client = subprocess.Popen(["nbdcopy", "--request-size=65536", doc["uri"], "null:"],
                                      stderr=subprocess.DEVNULL)
            time.sleep(0.05 + 0.04 * k)
            client.kill()
            client.wait(timeout=30)
        out = tmp_path / "after.img"
        subprocess.run(["nbdcopy", doc["uri"], str(out)], check=True, timeout=120)
        assert same_file(str(out), restored["d@2"])
        assert proc.poll() is None
    finally:
        err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, err


def test_parallel_requests_serve_the_same_bytes(point, tmp_path):
    """--parallel-requests: nbdkit's PARALLEL model, many requests of one
    connection at once through the view's locked caches."""
    store, restored = point
    out = tmp_path / "parallel.img"
    doc, _ = serve_json(store, "d@2", "--parallel-requests", "--cache", "256K", "--run",
                        f'nbdcopy -C 1 --requests 32 --request-size=65536 "$uri" {out}')
    assert same_file(str(out), restored["d@2"])
    assert doc["stats"]["requests"] >= doc["stats"]["chunks_read"] > 0


BLOCK_STATUS = r'''
import json, sys
import nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
out = {"size": h.get_size(), "one": [], "all": []}
for offset in map(int, sys.argv[2:]):
    got = []
    h.block_status(min(1 << 30, out["size"] - offset), offset,
                   lambda ctx, off, entries, err: got.append(list(entries)) or 0, nbd.CMD_FLAG_REQ_ONE)
    out["one"].append([offset] + got[0][:2] + [len(got[0]) // 2])
pos = 0
while pos < out["size"]:
    got = []
    h.block_status(min(1 << 30, out["size"] - pos), pos,
                   lambda ctx, off, entries, err: got.append(list(entries)) or 0)
    for n, flags in zip(got[0][::2], got[0][1::2]):
        out["all"].append([pos, n, flags])
        pos += n
h.shutdown()
print(json.dumps(out))
'''


@pytest.mark.skipif(subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True,
                                   timeout=60).returncode != 0,
                    reason="needs Debian's python3-libnbd (tools/install.sh --test)")
def test_block_status_through_libnbd_one_extent_and_all(point, tmp_path):
    """libnbd's block_status (python3-libnbd, run by Debian's python3), the
    way a client library sees the export: REQ_ONE at odd offsets gives one
    extent starting there, of the right kind (nbdkit trims the plugin's reply
    to one itself), and the map walked request by request is the manifest's
    zero chunks."""
    store, restored = point
    script = tmp_path / "status.py"
    script.write_text(BLOCK_STATUS)
    runs = zero_runs(restored["d@2"])
    probes = [0, CS + 7, runs[1][0], (64 << 20) - 1, runs[-1][0]]
    proc = run_cli("serve", store, "d@2", "--run",
                   f'/usr/bin/python3 {script} "$uri" {" ".join(map(str, probes))}', timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    merged: list[list] = []
    for off, n, flags in doc["all"]:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += n
        else:
            merged.append([off, n, flags])
    assert [(o, n, f == 3) for o, n, f in merged] == runs
    for (offset, length, flags, count), probe in zip(doc["one"], probes):
        run = next(r for r in runs if r[0] <= probe < r[0] + r[1])
        assert offset == probe and (flags == 3) == run[2] and count == 1
        assert 0 < length <= run[0] + run[1] - probe
