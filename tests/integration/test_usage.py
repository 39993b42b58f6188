"""Usage errors (exit 2): nonsense option values, store URLs, arguments in the wrong
order; and the help's examples work as written."""

import os
import shlex
import subprocess
import sys

import pytest

from helpers import REPO_ROOT, make_sparse, rng, run_cli, same_file, store_fingerprint, write_at

CS = 64 << 10
SERVER = ["--server", "127.0.0.1:9", "--insecure"]  # never reached: the arguments are refused first


@pytest.fixture
def populated(store_path, tmp_path):
    img = str(tmp_path / "d.img")
    make_sparse(img, 16 * CS)
    write_at(img, CS, rng(80).bytes(2 * CS))
    proc = run_cli("backup", store_path, img, "--disk", "d")
    assert proc.returncode == 0, proc.stderr
    return store_path, img


def _usage_error(args, *needles, cwd=REPO_ROOT):
    proc = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": REPO_ROOT}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in proc.stderr, (args, proc.stderr)
    return proc


NONSENSE = [
    (["backup", "{store}", "{img}", "--disk", "d", "--threads", "0"], "--threads: 0 threads: give 1 to 256"),
    (["backup", "{store}", "{img}", "--disk", "d", "--threads", "-3"], "give 1 to 256"),
    (["backup", "{store}", "{img}", "--disk", "d", "--threads", "100000"], "give 1 to 256"),
    (["backup", "{store}", "{img}", "--disk", "d", "--threads", "two"], "'two' is not a whole number of threads"),
    (["backup", "{store}", "{img}", "--disk", "d", "--wait", "-5"], "--wait: -5: give 0 or more seconds"),
    (["backup", "{store}", "{img}", "--disk", "d", "--wait", "nan"], "give 0 or more seconds"),
    (["backup", "{store}", "{img}", "--disk", "d", "--wait", "soon"], "'soon' is not a number of seconds"),
    (["restore", "{store}", "d@1", "{out}", "--threads", "0"], "--threads"),
    (["verify", "{store}", "--threads", "0"], "--threads"),
    (["rebuild-index", "{store}", "--wait", "-1"], "--wait"),
    (["init", "{new}", "--chunk-size", "3M"], "not a power of two between 64K and 8M"),
    (["init", "{new}", "--chunk-size", "32K"], "not a power of two"),
    (["init", "{new}", "--chunk-size", "lots"], "is not a size"),
    (["init", "{new}", "--compression-level", "23"], "zstd level 23 is outside -7..22"),
    (["init", "{new}", "--compression-level", "-8"], "outside -7..22"),
    (["demo", "--dir", "{new}", "--size", "0"], "--size: 0: the demo image needs at least 1M"),
    (["vsphere", "backup", "{store}", "--vm", "x", *SERVER, "--threads", "0"], "--threads"),
    (["vsphere", "backup", "{store}", "--vm", "x", *SERVER, "--wait", "-5"], "--wait"),
    (["vsphere", "backup", "{store}", "--vm", "x", *SERVER, "--cbt-sample", "1.5"], "between 0 and 1"),
    (["vsphere", "backup", "{store}", "--vm", "x", *SERVER, "--cbt-sample", "nan"], "between 0 and 1"),
    (["vsphere", "backup", "{store}", "--vm", "x", *SERVER, "--timeout", "0"], "--timeout: 0: give a number"),
    (["vsphere", "restore", "{store}", "x@1", "--name", "y", *SERVER, "--threads", "0"], "--threads"),
    (["vsphere", "vms", *SERVER, "--timeout", "-1"], "--timeout"),
    # Issue 9 item 16: in every command that takes them.
    *[(cmd + [opt, value], needle)
      for cmd in (["backup", "{store}", "{img}", "--disk", "d"], ["restore", "{store}", "d@1", "{out}"],
                  ["verify", "{store}"], ["vsphere", "backup", "{store}", "--vm", "x", *SERVER],
                  ["vsphere", "restore", "{store}", "x@1", "--name", "y", *SERVER])
      for opt, value, needle in (("--threads", "-1", "argument --threads: -1 threads: give 1 to 256"),
                                 ("--threads", "1000", "argument --threads: 1000 threads: give 1 to 256"),
                                 ("--threads", "²", "argument --threads: '²' is not a whole number"))],
    *[(cmd + [f"--wait={value}"], f"argument --wait: {value}: give 0 or more seconds")
      for cmd in (["backup", "{store}", "{img}", "--disk", "d"], ["rebuild-index", "{store}"],
                  ["vsphere", "backup", "{store}", "--vm", "x", *SERVER])
      for value in ("nan", "NaN", "-inf")],
    (["backup", "{store}", "{img}", "--disk", "d", "--threads", "٣"], "'٣' is not a whole number of threads"),
    (["backup", "{store}", "{img}", "--disk", "d", "--wait", "٣"], "'٣' is not a number of seconds"),
    (["restore", "{store}", "d@²", "{out}"], "'d@²' is not a backup id; write d@3"),
    (["restore", "{store}", "d@-²", "{out}"], "'d@-²' is not a backup id"),
    (["restore", "{store}", "d@4294967296", "{out}"],
     "'d@4294967296': 4294967296 is past the largest point number there can be, 4294967295"),
    (["restore", "{store}", "d@-4294967296", "{out}"], "goes back further than the largest point number"),
    (["restore", "{store}", "d@99999999999999999999999", "{out}"], "is past the largest point number"),
    (["vsphere", "restore", "{store}", "x@²", "--name", "y", *SERVER], "'x@²' is not a VM backup id"),
    (["vsphere", "restore", "{store}", "x@4294967296", "--name", "y", *SERVER],
     "4294967296 is past the largest point number"),
]


@pytest.mark.parametrize("args,needle", NONSENSE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_nonsense_values_are_usage_errors(populated, tmp_path, args, needle):
    store, img = populated
    before = store_fingerprint(store)
    subst = {"store": store, "img": img, "out": str(tmp_path / "out.img"), "new": str(tmp_path / "new")}
    _usage_error([a.format(**subst) for a in args], needle)
    assert store_fingerprint(store) == before
    assert not os.path.exists(tmp_path / "new") and not os.path.exists(tmp_path / "out.img")


def test_wait_inf_is_accepted(populated):
    store, img = populated
    proc = run_cli("backup", store, img, "--disk", "d", "--wait", "inf", "--threads", "1")
    assert proc.returncode == 0 and proc.stdout.strip() == "d@2", proc.stderr


@pytest.mark.parametrize("url", ["sftp://host/srv/store", "gs://b/x"])
@pytest.mark.parametrize("command", [
    ["init", "{url}"], ["backup", "{url}", "{img}", "--disk", "d"], ["list", "{url}"],
    ["restore", "{url}", "d@1", "{out}"], ["verify", "{url}"], ["stats", "{url}"], ["rebuild-index", "{url}"],
    ["vsphere", "backup", "{url}", "--vm", "x", *SERVER], ["vsphere", "list", "{url}"],
    ["vsphere", "restore", "{url}", "x@1", "--name", "y", *SERVER], ["vsphere", "vms", *SERVER, "--store", "{url}"],
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v)
def test_store_urls_are_refused_not_made_into_directories(populated, tmp_path, command, url):
    _, img = populated
    work = tmp_path / "cwd"
    work.mkdir()
    args = [a.format(url=url, img=img, out=str(tmp_path / "out.img")) for a in command]
    _usage_error(args, f"{url}: a store must be a local directory", "not supported yet", cwd=str(work))
    assert os.listdir(work) == [] and not os.path.exists(tmp_path / "out.img")


def test_a_vddk_url_as_store_and_a_file_url(populated, tmp_path):
    store, img = populated
    _usage_error(["backup", "vddk://vc/vm-1?disk=[ds] a/a.vmdk&snapshot=s-1", img, "--disk", "d"],
                 "is a vSphere disk, not a store", "SOURCE")
    _usage_error(["list", f"file://{store}"], f"give the store as a path ({store}), not a URL")


def test_backup_with_image_and_store_swapped_names_both(populated):
    store, img = populated
    before = store_fingerprint(store)
    _usage_error(["backup", img, store, "--disk", "d"], "wrong order", f"{store} looks like the STORE",
                 f"{img} looks like the SOURCE", f"write: blockvault backup {store} {img} --disk d")
    assert store_fingerprint(store) == before


@pytest.mark.parametrize("order", [("target", "id", "store"), ("id", "store", "target"), ("store", "target", "id")])
def test_restore_with_arguments_swapped_names_them(populated, tmp_path, order):
    store, _ = populated
    out = str(tmp_path / "out.img")
    values = {"store": store, "id": "d@1", "target": out}
    proc = _usage_error(["restore", *(values[k] for k in order)], "wrong order",
                        f"write: blockvault restore {store} d@1 {out}")
    assert not os.path.lexists(out) and not os.path.lexists(out + ".blockvault-partial"), proc.stderr


def test_vm_restore_with_store_and_id_swapped(populated):
    store, _ = populated
    _usage_error(["vsphere", "restore", "web01@3", store, "--name", "y", *SERVER], "wrong order",
                 f"{store} looks like the STORE", f"write: blockvault vsphere restore {store} web01@3")


def test_malformed_id_exit_2_unknown_id_exit_1(populated, tmp_path):
    store, _ = populated
    out = str(tmp_path / "out.img")
    _usage_error(["restore", store, "d@first", out], "'d@first' is not a backup id", "write d@3 (the third), "
                 "d@latest, d@-1 (the one before the latest) or d@2026-11-30 (the last of that local day)")
    _usage_error(["restore", store, "d", out], "'d' is not a backup id; write d@3")
    proc = run_cli("restore", store, "d@7", out)
    assert proc.returncode == 1 and "no backup d@7; d has one backup, d@1 (" in proc.stderr
    assert not os.path.lexists(out)


def _examples(command: list[str]) -> list[str]:
    text = run_cli(*command, "--help").stdout
    lines = text.split("example", 1)[1].splitlines()[1:]
    return [line.split("#")[0].strip() for line in lines if line.strip().startswith("blockvault ")]


def test_backup_help_examples_work_in_order_on_a_fresh_store(tmp_path):
    store, img, cbt = str(tmp_path / "store"), str(tmp_path / "disk.img"), str(tmp_path / "cbt.json")
    assert run_cli("init", store).returncode == 0
    make_sparse(img, 64 * CS)
    write_at(img, 0, rng(81).bytes(8 * CS))
    examples = [e for e in _examples(["backup"]) if "disk.img" in e]
    assert len(examples) >= 2 and "--mode" not in examples[0]
    versions = []
    for n, example in enumerate(examples):
        if n:
            write_at(img, 3 * CS, rng(82 + n).bytes(CS))
            open(cbt, "w").write(f'{{"startOffset": 0, "length": {64 * CS}, '
                                 f'"changedArea": [{{"start": {3 * CS}, "length": {CS}}}]}}')
        args = [{"/backup/store": store, "disk.img": img, "cbt.json": cbt}.get(a, a)
                for a in shlex.split(example)[1:]]
        proc = run_cli(*args)
        assert proc.returncode == 0, (example, proc.stderr)
        versions.append(open(img, "rb").read())
    for n, data in enumerate(versions, 1):
        out = tmp_path / f"r{n}.img"
        assert run_cli("restore", store, f"db01@{n}", str(out)).returncode == 0
        assert out.read_bytes() == data
    # restore --help's file examples, on those points: @latest is the second, @-1 the first.
    wanted = {"db01@latest": versions[-1], "db01@-1": versions[-2]}
    restores = [e for e in _examples(["restore"]) if "vddk://" not in e and "db01@3" not in e]
    assert len(restores) == 2
    for example in restores:
        args = shlex.split(example)[1:]
        target = tmp_path / os.path.basename(args[3])
        proc = run_cli(*[{"/backup/store": store}.get(a, a) for a in args[:3]], str(target))
        assert proc.returncode == 0, (example, proc.stderr)
        if target.suffix == ".vmdk":
            raw = tmp_path / "from-vmdk.img"
            subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(target), str(raw)], check=True)
            target = raw
        assert target.read_bytes() == wanted[args[2]], example


def test_no_article_slips_in_messages(populated, tmp_path):
    store, img = populated
    proc = run_cli("backup", store, img, "--disk", "fresh", "--mode", "incremental")
    assert proc.returncode == 1 and "an incremental backup of disk 'fresh' needs" in proc.stderr
    proc = run_cli("backup", store, img, "--disk", "fresh", "--mode", "differential")
    assert "a differential backup of disk 'fresh' needs an earlier full backup" in proc.stderr


@pytest.mark.parametrize("url,needle", [("S3://b", "not a valid bucket name"), ("s3://bucket/backups/", "no trailing '/'"),
                                        ("s3://AKIA123:hunter2@bucket/x", "must not carry credentials")])
@pytest.mark.parametrize("command", [
    ["init", "{url}"], ["backup", "{url}", "{img}", "--disk", "d"], ["list", "{url}"],
    ["restore", "{url}", "d@1", "{out}"], ["verify", "{url}"], ["attach", "{url}"],
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v)
def test_bad_s3_store_urls_are_usage_errors_and_make_nothing(populated, tmp_path, command, url, needle):
    _, img = populated
    work = tmp_path / "cwd"
    work.mkdir()
    args = [a.format(url=url, img=img, out=str(tmp_path / "out.img")) for a in command]
    proc = _usage_error(args, needle, cwd=str(work))
    assert "hunter2" not in proc.stderr
    assert os.listdir(work) == [] and not os.path.exists(tmp_path / "out.img")
