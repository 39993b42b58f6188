import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from engine.repository import Repository  # noqa: E402

CHUNK = 64 << 10


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "store")
    Repository.init(path, chunk_size=CHUNK).close()
    return path


@pytest.fixture
def repo(store_path):
    r = Repository.open(store_path)
    yield r
    r.close()


# --- S3: one real Ceph cluster per test session (tests/s3cluster.py) ---------------------------

@pytest.fixture(scope="session")
def ceph():
    """The session's Ceph cluster.  Missing packages FAIL the test (never skip it): an S3
    test that silently does not run guards nothing."""
    import tempfile

    from s3cluster import CephCluster, free_port_base, missing_message
    if missing_message():
        pytest.fail(missing_message(), pytrace=False)
    for attempt in range(3):     # another run may take the free ports between the check and the start
        cluster = CephCluster()
        directory = tempfile.mkdtemp(prefix="bvc", dir="/tmp")   # short: admin-socket paths are limited
        try:
            cluster.start(directory, free_port_base())
            break
        except RuntimeError as exc:
            cluster.stop()
            if attempt == 2:
                pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3_bucket_name(ceph):
    """A fresh, empty bucket on the session's cluster (made by the test user)."""
    import uuid
    name = f"bv-{uuid.uuid4().hex[:16]}"
    ceph.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store_url(s3_bucket_name):
    """The URL of a store that does not exist yet, in a fresh bucket: s3://bv-…/store."""
    return f"s3://{s3_bucket_name}/store"
