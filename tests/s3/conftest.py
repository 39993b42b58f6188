"""What the tests of stores in a bucket share: the environment a CLI child gets."""

from __future__ import annotations

import pytest

from s3cluster import s3env_of


@pytest.fixture
def s3env(ceph):
    return s3env_of(ceph)
