import json
import os

import pytest

from chunkstore import ChunkStore, ConfigError, FormatVersionError, NotAStoreError, StoreExistsError
from chunkstore.config import StoreConfig, parse_size


@pytest.mark.parametrize("size", [0, 1000, 32 << 10, 3 << 20, 16 << 20])
def test_chunk_size_must_be_power_of_two_in_range(tmp_path, size):
    with pytest.raises(ConfigError, match="power of two"):
        ChunkStore.init(str(tmp_path / "s"), chunk_size=size)
    assert not os.path.exists(tmp_path / "s" / "config.json")


def test_sizes_parse():
    assert parse_size("64K") == 65536 and parse_size("1M") == 1 << 20 and parse_size("8MiB") == 8 << 20
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_config_roundtrip_and_seed_is_random(tmp_path):
    a = ChunkStore.init(str(tmp_path / "a"), chunk_size=1 << 20, digest="sha256", compression_level=5)
    b = ChunkStore.init(str(tmp_path / "b"))
    assert a.config.seed != b.config.seed and a.config.store_id != b.config.store_id
    a.close()
    b.close()
    again = StoreConfig.load(str(tmp_path / "a"))
    assert (again.chunk_size, again.digest, again.compression_level) == (1 << 20, "sha256", 5)


def test_future_format_version_is_refused(tmp_path):
    ChunkStore.init(str(tmp_path / "s")).close()
    path = tmp_path / "s" / "config.json"
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError, match="version 99"):
        ChunkStore.open(str(tmp_path / "s"))


def test_not_a_store(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(NotAStoreError, match="not a blockvault store"):
        ChunkStore.open(str(tmp_path / "x"))
    with pytest.raises(NotAStoreError, match="no such directory"):
        ChunkStore.open(str(tmp_path / "nowhere"))


def test_init_refuses_non_empty_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "file").write_text("keep me")
    with pytest.raises(StoreExistsError):
        ChunkStore.init(str(tmp_path / "s"))
    assert (tmp_path / "s" / "file").read_text() == "keep me"
