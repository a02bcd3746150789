"""Token shards: exact round trips, integrity checks that name the file, manifests."""

import dataclasses
import json

import numpy as np
import pytest

from model.shards import (
    Manifest,
    ShardInfo,
    ShardIntegrityError,
    SourceInfo,
    read_tokens,
    sha256_file,
    token_dtype,
    verify_shard,
    write_shard,
)


@pytest.fixture
def shard(tmp_path):
    tokens = np.arange(1000, dtype=np.int64) * 61 % 65536
    path = tmp_path / "fr-00000.bin"
    sha256 = write_shard(tokens, path, "uint16")
    return path, tokens, sha256


def _info(shard_id: str, sha256: str = "0" * 64, tokens: int = 10) -> ShardInfo:
    return ShardInfo(
        shard_id, f"{shard_id}.bin", sha256, tokens, "uint16", "fr", "wiki-fr", "CC-BY-SA-4.0", "2021-01-01", "2021-06-30"
    )


SOURCES = [SourceInfo("wiki-fr", "fr", "CC-BY-SA-4.0", 32.4, "2021-01-01", "2021-12-31")]


def test_written_shard_reads_back_any_range_as_int64(shard):
    path, tokens, sha256 = shard
    assert sha256 == sha256_file(path)
    assert path.stat().st_size == 2 * len(tokens)
    got = read_tokens(path, "uint16", 137, 612)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, tokens[137:612])
    assert len(read_tokens(path, "uint16", 1000, 1000)) == 0
    assert not list(path.parent.glob("*.tmp"))


def test_uint32_shards_keep_ids_above_65535(tmp_path):
    tokens = np.array([0, 65535, 65536, 2**32 - 1], dtype=np.int64)
    path = tmp_path / "big.bin"
    write_shard(tokens, path, token_dtype(100_000))
    np.testing.assert_array_equal(read_tokens(path, "uint32", 0, 4), tokens)


def test_ids_that_do_not_fit_the_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_shard(np.array([1, 70_000]), tmp_path / "x.bin", "uint16")


def test_token_dtype_switches_above_65536():
    assert token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"


def test_intact_shard_verifies(shard):
    path, tokens, sha256 = shard
    verify_shard(path, sha256, len(tokens), "uint16")


def test_flipped_byte_is_caught_naming_the_file(shard):
    path, tokens, sha256 = shard
    data = bytearray(path.read_bytes())
    data[501] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="fr-00000.bin") as excinfo:
        verify_shard(path, sha256, len(tokens), "uint16")
    assert sha256 in str(excinfo.value)
    assert "essaim data prepare" in str(excinfo.value)


def test_truncated_shard_is_caught_naming_the_file(shard):
    path, tokens, sha256 = shard
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardIntegrityError, match=r"fr-00000\.bin has 1998 bytes, expected 2000"):
        verify_shard(path, sha256, len(tokens), "uint16")


def test_missing_shard_is_caught_naming_the_file(shard):
    path, tokens, sha256 = shard
    path.unlink()
    with pytest.raises(ShardIntegrityError, match=r"fr-00000\.bin is missing"):
        verify_shard(path, sha256, len(tokens), "uint16")


@pytest.mark.parametrize("start,end", [(-1, 10), (10, 5), (990, 1001)])
def test_read_outside_the_shard_is_refused(shard, start, end):
    path, _, _ = shard
    with pytest.raises(ValueError, match="holds 1000 tokens"):
        read_tokens(path, "uint16", start, end)


def test_manifest_round_trips_and_keeps_its_root_hash(tmp_path):
    manifest = Manifest(4096, "ab" * 32, SOURCES, [_info("b-00000"), _info("a-00000")])
    path = tmp_path / "manifest.json"
    manifest.save(path)
    loaded = Manifest.load(path)
    assert loaded == manifest
    assert loaded.root_hash() == manifest.root_hash()
    assert not list(tmp_path.glob("*.tmp"))


def test_root_hash_ignores_order_but_not_content():
    shards = [_info("a-00000"), _info("b-00000")]
    base = Manifest(4096, "ab" * 32, SOURCES, shards)
    assert Manifest(4096, "ab" * 32, SOURCES, shards[::-1]).root_hash() == base.root_hash()
    changed = [dataclasses.replace(shards[0], tokens=11), shards[1]]
    assert Manifest(4096, "ab" * 32, SOURCES, changed).root_hash() != base.root_hash()
    relicensed = [dataclasses.replace(shards[0], licence="CC0-1.0"), shards[1]]
    assert Manifest(4096, "ab" * 32, SOURCES, relicensed).root_hash() != base.root_hash()
    assert Manifest(4096, "cd" * 32, SOURCES, shards).root_hash() != base.root_hash()
    reweighted = [dataclasses.replace(SOURCES[0], weight=1.0)]
    assert Manifest(4096, "ab" * 32, reweighted, shards).root_hash() != base.root_hash()


def test_a_manifest_whose_shards_name_an_unlisted_source_is_refused(tmp_path):
    path = tmp_path / "manifest.json"
    Manifest(4096, "ab" * 32, [], [_info("a-00000")]).save(path)
    with pytest.raises(ValueError, match="shards of source 'wiki-fr', which it does not list"):
        Manifest.load(path)


def test_manifest_edited_by_hand_is_refused(tmp_path):
    path = tmp_path / "manifest.json"
    Manifest(4096, "ab" * 32, SOURCES, [_info("a-00000")]).save(path)
    document = json.loads(path.read_text())
    document["shards"][0]["tokens"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="edited after it was written"):
        Manifest.load(path)


def test_missing_or_malformed_manifest_errors_name_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Manifest.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        Manifest.load(path)
    path.write_text(json.dumps({"vocab_size": 10, "shards": []}))
    with pytest.raises(ValueError, match="manifest.json is malformed.*tokenizer_sha256"):
        Manifest.load(path)
