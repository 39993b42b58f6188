"""Backup ids through the real command: each form restores the right point, byte for byte,
and never a point of another disk whose name starts the same way."""

import time

from helpers import make_sparse, rng, run_cli, snapshot, write_at

CS = 64 << 10


def test_every_id_form_restores_its_point(store_path, tmp_path):
    store = store_path
    img = str(tmp_path / "d.img")
    make_sparse(img, 32 * CS)
    versions = {}
    for disk, points in (("d", 3), ("d2", 2)):          # d2: d's name plus a character
        for n in range(1, points + 1):
            write_at(img, n * CS, rng(90 + n + 10 * len(disk)).bytes(CS + 17))
            proc = run_cli("backup", store, img, "--disk", disk)
            assert proc.returncode == 0 and proc.stdout.strip() == f"{disk}@{n}", proc.stderr
            versions[f"{disk}@{n}"] = snapshot(img, str(tmp_path / f"{disk}-{n}.src"))
    today = time.strftime("%Y-%m-%d")
    for ref, point in [("d@LATEST", "d@3"), ("d@latest", "d@3"), ("d@-1", "d@2"), ("d@-2", "d@1"),
                       (f"d@{today}", "d@3"), ("d2@-1", "d2@1"), ("d2@Latest", "d2@2"), (f"d2@{today}", "d2@2")]:
        out = tmp_path / "out.img"
        proc = run_cli("restore", store, ref, str(out), "--json")
        assert proc.returncode == 0, (ref, proc.stderr)
        assert f'"id": "{point}"' in proc.stdout
        assert out.read_bytes() == open(versions[point], "rb").read(), ref
        out.unlink()
    proc = run_cli("restore", store, "d@-3", str(tmp_path / "out.img"))
    assert proc.returncode == 1 and "no backup d@-3; d has 3 backups; the newest: d@3 (" in proc.stderr
    assert "d2@" not in proc.stderr
    proc = run_cli("restore", store, "d2@2020-01-01", str(tmp_path / "out.img"))
    assert proc.returncode == 1 and "d2 has 2 backups" in proc.stderr and "d@" not in proc.stderr.replace("d2@", "")
