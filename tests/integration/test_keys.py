"""An encrypted store's keys through the real command line (``python -m engine.cli``): init
--encryption, key list|add|remove|change|export, the key sources (never argv), and what a
wrong, missing or removed key does.  Every command runs as a child process without a
terminal, as a nightly job would."""

import json
import os
import subprocess
import sys


from helpers import REPO_ROOT, rng, run_cli, same_file, store_fingerprint

PASSPHRASE = "Tr0ub4dor-3-unique-5f2c91"
# Cheap argon2id for the tests' own slots (chunkstore/keyslots.py ENV_ARGON2): the stored
# parameters are what unlocking uses, so nothing else differs.  One test keeps the defaults.
CHEAP = {"BLOCKVAULT_ARGON2": "1,8192,1"}


def env_with(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env.update(CHEAP)
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def cli(*args, **env):
    return run_cli(*args, env=env_with(**env))


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def init_store(tmp_path, *extra, **env) -> str:
    store = str(tmp_path / "store")
    env.setdefault("BLOCKVAULT_PASSPHRASE", PASSPHRASE)
    ok(cli("init", store, "--encryption", "aes-256-gcm", "--chunk-size", "64K", *extra, **env))
    return store


def slots(store, **env) -> list[dict]:
    return json.loads(ok(cli("key", "list", store, "--json", **env)).stdout)["slots"]


def image(tmp_path, name="disk.img", seed=1, size=3 << 20) -> str:
    path = str(tmp_path / name)
    r = rng(seed)
    with open(path, "wb") as f:
        f.write(r.bytes(size // 2) + bytes(size // 4) + r.bytes(size // 4))
    return path


def write_file(path, text, mode=0o600) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return str(path)


def test_init_writes_one_slot_with_the_measured_argon2_cost_and_the_passphrase_opens_it(tmp_path):
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env["BLOCKVAULT_PASSPHRASE"] = PASSPHRASE
    proc = run_cli("init", store, "--encryption", "chacha20-poly1305", "--json", env=env)
    doc = json.loads(ok(proc).stdout)
    assert doc["encryption"] == "chacha20-poly1305" and doc["format_version"] == 4
    assert [s["kind"] for s in doc["key_slots"]] == ["passphrase"]
    with open(os.path.join(store, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["version"] == 4 and cfg["encryption"] == "chacha20-poly1305" and len(cfg["key_check"]) == 32
    (name,) = os.listdir(os.path.join(store, "keys"))
    with open(os.path.join(store, "keys", name)) as f:
        slot = json.load(f)
    assert slot["kdf"]["name"] == "argon2id" and slot["kdf"]["memory_kib"] == 65536
    assert slot["kdf"]["time_cost"] == 13 and slot["kdf"]["parallelism"] == 1
    assert oct(os.stat(os.path.join(store, "keys", name)).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(store, "keys")).st_mode & 0o777) == "0o700"
    assert ok(run_cli("stats", store, "--json", env=env)).returncode == 0
    assert "warning: store" in proc.stderr and "key export" in proc.stderr


def test_no_key_and_no_terminal_stops_with_key_required_naming_the_ways(tmp_path):
    store = init_store(tmp_path)
    for verb in (("list", store), ("stats", store), ("verify", store), ("key", "export", store, str(tmp_path / "e"))):
        proc = cli(*verb, "--json")
        assert proc.returncode == 2, (verb, proc.stderr)
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "key_required"
        for way in ("BLOCKVAULT_PASSPHRASE", "--passphrase-file", "--key-file", "BLOCKVAULT_KEY_FILE"):
            assert way in err["message"]
    assert not os.path.exists(tmp_path / "e")
    proc = cli("init", str(tmp_path / "other"), "--encryption", "aes-256-gcm")
    assert proc.returncode == 2 and "--new-key-file" in proc.stderr and not os.path.exists(tmp_path / "other")


def test_a_wrong_passphrase_is_refused_and_changes_nothing(tmp_path):
    store = init_store(tmp_path)
    img = image(tmp_path)
    ok(cli("backup", store, img, "--disk", "d", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    before = store_fingerprint(store)
    for verb in (("backup", store, img, "--disk", "d"), ("delete", store, "d@1"), ("gc", store),
                 ("key", "add", store, "--new-key-file", str(tmp_path / "k"))):
        proc = cli(*verb, "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE + "x")
        assert proc.returncode == 1, (verb, proc.stderr)
        err = json.loads(proc.stdout)["error"]
        assert err["code"] == "wrong_key" and "wrong passphrase" in err["message"], verb
    assert store_fingerprint(store) == before
    assert not os.path.exists(tmp_path / "k")
    out = str(tmp_path / "out")
    ok(cli("restore", store, "d@1", out, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert same_file(out, img)


def test_a_missing_or_foreign_key_file_is_refused_by_name(tmp_path):
    store = init_store(tmp_path)
    proc = cli("stats", store, "--key-file", str(tmp_path / "nope"), "--json")
    assert proc.returncode == 1 and "--key-file" in proc.stderr and "no such file" in proc.stderr
    proc = cli("stats", store, BLOCKVAULT_KEY_FILE=str(tmp_path / "nope"))
    assert proc.returncode == 1 and "BLOCKVAULT_KEY_FILE" in proc.stderr
    # the key file of another store opens none of this one's slots
    other = str(tmp_path / "other")
    ok(cli("init", other, "--encryption", "aes-256-gcm", "--new-key-file", str(tmp_path / "other.key")))
    ok(cli("key", "add", store, "--new-key-file", str(tmp_path / "mine.key"), BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    proc = cli("stats", store, "--key-file", str(tmp_path / "other.key"), "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "wrong_key"
    ok(cli("stats", store, "--key-file", str(tmp_path / "mine.key")))
    pw = write_file(tmp_path / "pw", PASSPHRASE + "\n")
    proc = cli("stats", store, "--key-file", str(tmp_path / "mine.key"), "--passphrase-file", pw)
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_a_removed_slot_no_longer_opens_the_store_while_another_does_and_the_last_is_refused(tmp_path):
    store = init_store(tmp_path)
    key = str(tmp_path / "nightly.key")
    ok(cli("key", "add", store, "--new-key-file", key, "--label", "nightly", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    both = slots(store)
    assert sorted(s["kind"] for s in both) == ["key-file", "passphrase"]
    pw_slot = next(s["id"] for s in both if s["kind"] == "passphrase")
    file_slot = next(s["id"] for s in both if s["kind"] == "key-file")
    assert next(s["label"] for s in both if s["kind"] == "key-file") == "nightly"
    # the slot this command authenticated with may go, since another remains
    proc = ok(cli("key", "remove", store, pw_slot, "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert json.loads(proc.stdout)["was_the_slot_used"] is True
    assert [s["id"] for s in slots(store)] == [file_slot]
    proc = cli("stats", store, "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["code"] == "wrong_key"
    assert "no passphrase slot" in proc.stderr
    ok(cli("stats", store, "--key-file", key))
    before = store_fingerprint(store)
    proc = cli("key", "remove", store, file_slot[:6], "--key-file", key, "--json")
    assert proc.returncode == 1 and "last key slot" in proc.stderr
    assert store_fingerprint(store) == before and [s["id"] for s in slots(store)] == [file_slot]


def test_key_change_replaces_the_passphrase_and_keeps_the_label(tmp_path):
    store = init_store(tmp_path, "--label", "admins")
    (old,) = slots(store)
    new = write_file(tmp_path / "new", "correct horse battery staple\n")
    proc = ok(cli("key", "change", store, "--new-passphrase-file", new, "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    doc = json.loads(proc.stdout)
    assert doc["removed"] == old["id"] and doc["added"]["label"] == "admins"
    (now,) = slots(store)
    assert now["id"] == doc["added"]["id"] != old["id"]
    assert cli("stats", store, BLOCKVAULT_PASSPHRASE=PASSPHRASE).returncode == 1
    ok(cli("stats", store, "--passphrase-file", new))
    ok(cli("stats", store, BLOCKVAULT_PASSPHRASE="correct horse battery staple"))


def test_the_export_alone_opens_the_store_and_restores_byte_identical(tmp_path):
    key = str(tmp_path / "nightly.key")
    store = init_store(tmp_path, "--new-key-file", key)
    img = image(tmp_path)
    ok(cli("backup", store, img, "--disk", "d", "--key-file", key))
    export = str(tmp_path / "paper.txt")
    ok(cli("key", "export", store, export, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert oct(os.stat(export).st_mode & 0o777) == "0o600"
    proc = cli("key", "export", store, export, BLOCKVAULT_PASSPHRASE=PASSPHRASE)
    assert proc.returncode == 1 and "exists already" in proc.stderr
    with open(export) as f:
        text = f.read()
    assert PASSPHRASE not in text
    # every slot but the key file's removed; then the key file's slot is the last one (refused),
    # so the key file itself is what is lost: the export opens the store without either
    pw_slot = next(s["id"] for s in slots(store) if s["kind"] == "passphrase")
    ok(cli("key", "remove", store, pw_slot, "--key-file", key))
    os.unlink(key)
    out = str(tmp_path / "out")
    ok(cli("restore", store, "d@1", out, "--key-file", export))
    assert same_file(out, img)
    os.unlink(out)
    ok(cli("restore", store, "d@1", out, BLOCKVAULT_KEY_FILE=export))
    assert same_file(out, img)
    # the export typed back from paper with a typo: named by line, refused
    lines = text.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("2 "))
    lines[row] = lines[row][:2] + ("0" if lines[row][2] != "0" else "1") + lines[row][3:]
    typo = write_file(tmp_path / "typo.txt", "\n".join(lines) + "\n")
    proc = cli("stats", store, "--key-file", typo)
    assert proc.returncode == 1 and "key line 2" in proc.stderr


def _all_bytes(directory: str) -> bytes:
    data = []
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data.append(f.read())
    return b"".join(data)


def test_the_passphrase_is_in_no_argv_no_output_no_log_and_no_store_byte(tmp_path):
    store = init_store(tmp_path)
    img = image(tmp_path)
    log = str(tmp_path / "bv.log")
    secret = PASSPHRASE.encode()
    outputs = []
    for args in (("backup", store, img, "--disk", "d", "-vv"), ("verify", store, "-vv"), ("list", store, "--json"),
                 ("key", "list", store, "--json"), ("stats", store, "--json")):
        proc = ok(cli(*args, "--log-file", log, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
        outputs += [proc.stdout, proc.stderr]
    for wrong in (PASSPHRASE + "x", PASSPHRASE[:-1]):
        proc = cli("list", store, "--json", "--log-file", log, BLOCKVAULT_PASSPHRASE=wrong)
        assert proc.returncode == 1
        outputs += [proc.stdout, proc.stderr]
        assert PASSPHRASE[:-1] not in proc.stdout + proc.stderr
    # while a command runs (serve holds the store open, with nbdkit as its child): no process's
    # argv holds the passphrase, and nbdkit's environment does not either
    serve = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", store, "d@1", "--json"], cwd=REPO_ROOT,
                             env=env_with(BLOCKVAULT_PASSPHRASE=PASSPHRASE), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        while not text.endswith("}\n"):   # one indented document, then it serves until stopped
            line = serve.stdout.readline()
            assert line, serve.stderr.read()
            text += line
        assert json.loads(text)["ok"]
        seen = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            assert secret not in cmdline, pid
            if b"nbdkit" in cmdline and store.encode() in cmdline:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read()
                assert secret not in environ and b"BLOCKVAULT_PASSPHRASE" not in environ
                seen += 1
        assert seen == 1, "nbdkit was not found"
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=60)
    outputs.append(err)
    with open(log, "rb") as f:
        assert secret not in f.read()
    assert not any(PASSPHRASE in o for o in outputs)
    stored = _all_bytes(store)
    assert secret not in stored and secret.hex().encode() not in stored
    # nor the master key: export it and look for its bytes and digits in the store
    export = str(tmp_path / "export")
    ok(cli("key", "export", store, export, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    from chunkstore.keyexport import read_key_file
    raw = read_key_file(export).master.to_bytes()
    for piece in (raw[:32], raw[32:], raw.hex().encode()):
        assert piece not in stored


def test_serve_hands_the_key_to_nbdkit_and_leaves_no_key_file(tmp_path):
    store = init_store(tmp_path)
    img = image(tmp_path)
    ok(cli("backup", store, img, "--disk", "d", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    out = str(tmp_path / "served.raw")
    before = set(os.listdir("/tmp"))
    proc = ok(cli("serve", store, "d@1", "--run", f'nbdcopy "$uri" {out}', BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert same_file(out, img), proc.stderr
    left = [n for n in set(os.listdir("/tmp")) - before if n.startswith("blockvault")]
    assert not left, left


def test_copy_takes_the_destination_key_from_its_own_options(tmp_path):
    src = init_store(tmp_path)
    dst = str(tmp_path / "dst")
    dst_key = str(tmp_path / "dst.key")
    ok(cli("init", dst, "--encryption", "chacha20-poly1305", "--chunk-size", "64K", "--new-key-file", dst_key))
    img = image(tmp_path)
    ok(cli("backup", src, img, "--disk", "d", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    proc = cli("copy", src, dst, "--all", "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE)
    assert proc.returncode == 2 and "BLOCKVAULT_DST_PASSPHRASE" in json.loads(proc.stdout)["error"]["message"]
    ok(cli("copy", src, dst, "--all", "--dst-key-file", dst_key, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    out = str(tmp_path / "out")
    ok(cli("restore", dst, "d@1", out, BLOCKVAULT_KEY_FILE=dst_key))
    assert same_file(out, img)


def test_the_plaintext_index_may_go_and_is_rebuilt_with_the_key(tmp_path):
    """README 'Keys': before a store's disk leaves the building its index/ may be removed;
    the other end rebuilds it from the packs, with the key and only with it."""
    import shutil
    store = init_store(tmp_path)
    img = image(tmp_path)
    ok(cli("backup", store, img, "--disk", "d", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    shutil.rmtree(os.path.join(store, "index"))
    proc = cli("rebuild", store, "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "key_required"
    assert not os.path.exists(os.path.join(store, "index"))
    ok(cli("rebuild", store, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    out = str(tmp_path / "out")
    ok(cli("restore", store, "d@1", out, BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    assert same_file(out, img)


def test_every_key_command_prints_what_json_md_documents(tmp_path):
    import jsonshape
    sections, codes = jsonshape.parse()
    assert codes["key_required"] == 2 and codes["wrong_key"] == 1

    def shape(proc, section):
        doc = json.loads(ok(proc).stdout)
        problems = jsonshape.check(doc, section, sections)
        assert not problems, "\n".join(problems)
        return doc

    key = str(tmp_path / "k")
    store = str(tmp_path / "store")
    shape(cli("init", store, "--encryption", "aes-256-gcm", "--new-key-file", key, "--json",
              BLOCKVAULT_PASSPHRASE=PASSPHRASE), "init")
    listed = shape(cli("key", "list", store, "--json"), "key list")
    shape(cli("key", "add", store, "--json", "--key-file", key, BLOCKVAULT_NEW_PASSPHRASE="other one"), "key add")
    pw = next(s["id"] for s in listed["slots"] if s["kind"] == "passphrase")
    shape(cli("key", "change", store, pw, "--json", "--key-file", key, BLOCKVAULT_NEW_PASSPHRASE="third one"),
          "key change")
    extra = next(s["id"] for s in shape(cli("key", "list", store, "--json"), "key list")["slots"]
                 if s["kind"] == "passphrase")
    shape(cli("key", "remove", store, extra, "--json", "--key-file", key), "key remove")
    shape(cli("key", "export", store, str(tmp_path / "e"), "--json", "--key-file", key), "key export")
    shape(cli("init", str(tmp_path / "plain"), "--json"), "init")


def _on_a_terminal(args, answers, **env):
    """Run the CLI with a pseudo-terminal as stdin (and no controlling terminal, so getpass
    asks on stderr and reads the pty); type each answer once its prompt has appeared."""
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, env=env_with(**env),
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    os.close(slave)
    err = b""
    try:
        for prompt, answer in answers:
            while prompt.encode() not in err:
                piece = os.read(proc.stderr.fileno(), 4096)
                assert piece, (prompt, err)
                err += piece
            err = err.split(prompt.encode(), 1)[1]
            os.write(master, answer.encode() + b"\n")
        out, rest = proc.communicate(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), (err + rest).decode()


def test_the_passphrase_is_asked_on_a_terminal_and_typed_twice_for_a_new_one(tmp_path):
    store = str(tmp_path / "store")
    rc, _, err = _on_a_terminal(["init", store, "--encryption", "aes-256-gcm"],
                                [("new passphrase of", PASSPHRASE), ("the same passphrase again", PASSPHRASE + "!")])
    assert rc == 1 and "differ" in err and not os.path.exists(store)
    rc, _, err = _on_a_terminal(["init", store, "--encryption", "aes-256-gcm"],
                                [("new passphrase of", PASSPHRASE), ("the same passphrase again", PASSPHRASE)])
    assert rc == 0, err
    rc, out, err = _on_a_terminal(["stats", store, "--json"], [(f"passphrase of {store}", PASSPHRASE)])
    assert rc == 0 and json.loads(out)["ok"], err
    rc, out, err = _on_a_terminal(["stats", store, "--json"], [(f"passphrase of {store}", "not it")])
    assert rc == 1 and json.loads(out)["error"]["code"] == "wrong_key"
    assert PASSPHRASE not in out + err


def test_mount_of_an_encrypted_store_reads_the_point_and_leaves_no_key_file(tmp_path):
    store = init_store(tmp_path)
    img = image(tmp_path)
    ok(cli("backup", store, img, "--disk", "d", BLOCKVAULT_PASSPHRASE=PASSPHRASE))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = {n for n in os.listdir("/tmp") if n.startswith("blockvault-mount-")}
    doc = json.loads(ok(cli("mount", store, "d@1", str(mnt), "--json", BLOCKVAULT_PASSPHRASE=PASSPHRASE)).stdout)
    try:
        assert same_file(doc["file"], img)
        with open(f"/proc/{doc['pid']}/environ", "rb") as f:
            assert PASSPHRASE.encode() not in f.read()
        assert {n for n in os.listdir("/tmp") if n.startswith("blockvault-mount-")} == before
    finally:
        ok(cli("umount", str(mnt)))
