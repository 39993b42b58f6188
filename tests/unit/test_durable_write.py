"""The small files of a store and of its cache are written whole, 0600, and never through a link."""

import os

from chunkstore import objectlock, safefs
from chunkstore.s3store import write_cache_file


def test_a_link_at_the_temporary_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    target = tmp_path / "store" / "doc.json"
    target.parent.mkdir()
    os.symlink(victim, target.parent / ".doc.json.tmp")
    safefs.write_durably(str(target), b"new\n", "test file")
    assert victim.read_bytes() == b"keep me\n"
    assert target.read_bytes() == b"new\n" and not target.is_symlink()
    assert os.listdir(target.parent) == ["doc.json"]


def test_cache_files_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_cache_file(str(tmp_path), "s3://b/p", "http://127.0.0.1:1", "ab" * 16)
        objectlock.write_cache(str(tmp_path), {"lease_bucket": "b-lease", "days": 30})
    finally:
        os.umask(old)
    for name in ("cache.json", objectlock.CACHE_LOCK_FILE):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600, name
    assert objectlock.read_cache(str(tmp_path))["lease_bucket"] == "b-lease"
