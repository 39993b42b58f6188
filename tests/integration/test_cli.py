import json
import subprocess
import sys
import time

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, text_bytes, write_at

CS = 64 << 10


def test_full_cycle_through_the_command(tmp_path):
    store, img = str(tmp_path / "store"), str(tmp_path / "d.img")
    assert run_cli("init", store, "--chunk-size", "128K", "--digest", "sha256").returncode == 0
    make_sparse(img, 64 * CS + 3)
    write_at(img, 5 * CS + 7, text_bytes(rng(50), 300_000))
    proc = run_cli("backup", store, img, "--disk", "web01", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["id"] == "web01@1" and doc["kind"] == "full" and doc["stats"]["new_chunks"] > 0
    # No progress noise when not on a terminal: stderr holds exactly the
    # one-line summary (issue 8 item 10 asks for it whatever stdout is).
    assert "\r" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("blockvault: backup web01@1 full: read ")

    plain = run_cli("backup", store, img, "--disk", "web01", "--mode", "incremental")
    assert plain.returncode == 0 and plain.stdout.strip() == "web01@2"

    listing = json.loads(run_cli("list", store, "--json").stdout)
    assert [b["id"] for b in listing["backups"]] == ["web01@1", "web01@2"]
    assert listing["backups"][1]["base"] == "web01@1"
    table = run_cli("list", store, "--disk", "web01").stdout
    assert "web01@2" in table and "incremental" in table

    stats = json.loads(run_cli("stats", store, "--json").stdout)
    assert stats["backups"] == 2 and stats["chunks"] > 0 and stats["digest"] == "sha256"
    assert stats["dedup_ratio"] >= 1.9 and stats["compression_ratio"] > 1.5

    out = str(tmp_path / "r.img")
    rest = run_cli("restore", store, "web01@latest", out, "--json")
    assert rest.returncode == 0, rest.stderr
    assert json.loads(rest.stdout)["id"] == "web01@2" and same_file(out, img)
    assert run_cli("verify", store).returncode == 0


def test_second_writer_fails_fast_with_exit_4(store_path, tmp_path):
    img = str(tmp_path / "d.img")
    make_sparse(img, CS)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from chunkstore import ChunkStore; s = ChunkStore.open(sys.argv[1]); "
         "w = s.writer(purpose='test holder', chains=[('disk', 'x')]); print('held', flush=True); "
         "time.sleep(30)", store_path],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        proc = run_cli("backup", store_path, img, "--disk", "x", "--wait", "0.5")
        assert proc.returncode == 4
        assert "busy" in proc.stderr and "test holder" in proc.stderr and f"pid {holder.pid}" in proc.stderr
        assert time.monotonic() - started < 20
        # Readers are never blocked by the writer.
        assert run_cli("list", store_path).returncode == 0
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("backup", store_path, img, "--disk", "x").returncode == 0


def test_help_has_examples():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "exit codes" in proc.stdout
    sub = run_cli("backup", "--help")
    assert "--changed-areas" in sub.stdout and "example" in sub.stdout

