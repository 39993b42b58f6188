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
