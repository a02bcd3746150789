"""Shards travel to workers: fetched by byte range, verified chunk by chunk, resumed, cached under a cap."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from model.shards import Manifest, ShardInfo, read_tokens
from protocol import essaim_pb2 as pb
from protocol.identity import Identity
from http_ranges import serve_files
from worker.capabilities import Capabilities
from worker.client import CoordinatorClient
from worker.corpus_source import CoordinatorSource, UrlSource
from worker.shards import ShardStore, ShardUnavailable, open_store


def run_config_for(data: Path, data_url: str = "") -> pb.RunConfig:
    """What a coordinator serving ``data`` tells its workers about the corpus."""
    manifest = Manifest.load(data / "manifest.json")
    tokenizer_json = (data / "tokenizer" / "tokenizer.json").read_bytes()
    return pb.RunConfig(run_id="test", tokenizer_json=tokenizer_json,
                        tokenizer_sha256=hashlib.sha256(tokenizer_json).hexdigest(),
                        corpus_root_hash=manifest.root_hash(), data_url=data_url)


def lease_of(shard: ShardInfo, start: int, end: int, lease_id: int = 1) -> pb.Lease:
    return pb.Lease(lease_id=lease_id, shard_id=shard.shard_id, shard_file=shard.file, shard_sha256=shard.sha256,
                    shard_tokens=shard.tokens, dtype=shard.dtype, start=start, end=end)


def multi_chunk_shards(data: Path) -> list[ShardInfo]:
    return [s for s in Manifest.load(data / "manifest.json").shards if len(s.chunk_sha256) >= 3]


def chunk_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("chunks/*/*.chunk"))


@pytest.fixture
def served_corpus(corpus_dir: Path):  # type: ignore[no-untyped-def]
    yield from serve_files(corpus_dir)


def test_the_manifest_lists_chunk_hashes_under_its_root_hash(corpus_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(corpus_dir / "manifest.json")
    shard = multi_chunk_shards(corpus_dir)[0]
    data = (corpus_dir / shard.file).read_bytes()
    assert shard.chunk_sha256 == tuple(hashlib.sha256(data[i:i + 2048]).hexdigest() for i in range(0, len(data), 2048))
    edited = Manifest(manifest.vocab_size, manifest.tokenizer_sha256, manifest.sources,
                      [s if s.shard_id != shard.shard_id else ShardInfo(**{**s.__dict__, "chunk_sha256": ("0" * 64,) + s.chunk_sha256[1:]})
                       for s in manifest.shards], manifest.chunk_bytes)
    assert edited.root_hash() != manifest.root_hash()
    unchunked = Manifest(manifest.vocab_size, manifest.tokenizer_sha256, manifest.sources,
                         [ShardInfo(**{**s.__dict__, "chunk_sha256": ()}) for s in manifest.shards])
    unchunked.save(tmp_path / "manifest.json")  # a manifest written before chunk hashes: still loads, same hash as then
    assert Manifest.load(tmp_path / "manifest.json").root_hash() == unchunked.root_hash() != manifest.root_hash()


def test_a_worker_without_the_corpus_fetches_only_its_leases_chunks_from_the_coordinator(
    start_coordinator, corpus_dir: Path, tmp_path: Path
) -> None:
    coordinator = start_coordinator()
    client = CoordinatorClient(coordinator.address, Identity.load_or_create(tmp_path / "w.key"))
    try:
        client.register("w", "lab", Capabilities("cpu", 1 << 30, "volunteer", 0.0, "", 0.0))
        config = client.run_config()
        cache = tmp_path / "cache"
        store = open_store(config, cache, CoordinatorSource(client), cache_bytes=0)
        shard = multi_chunk_shards(corpus_dir)[0]
        tokens = store.tokens(lease_of(shard, 1500, 2600))  # bytes [3000, 5200): chunks 1 and 2 of 2048 bytes
        assert tokens.tolist() == read_tokens(corpus_dir / shard.file, shard.dtype, 1500, 2600).tolist()
        assert [p.name for p in chunk_files(cache)] == ["00000001.chunk", "00000002.chunk"]
        assert Manifest.load(cache / "manifest.json").root_hash() == config.corpus_root_hash
        with pytest.raises(Exception, match="not a file of this run's corpus"):  # the database is not served
            list(client.read_corpus_file("coordinator.db", 0, 0))
    finally:
        client.close()


def test_a_shard_corrupted_on_the_server_is_refused_named_and_its_lease_released(
    start_coordinator, corpus_dir: Path, tmp_path: Path
) -> None:
    from sqlalchemy import select

    from coordinator.store import Lease
    from support import start_worker, wait_for

    data = tmp_path / "served"
    shutil.copytree(corpus_dir, data, ignore=shutil.ignore_patterns("coordinator.db*"))
    manifest = Manifest.load(data / "manifest.json")
    for shard in manifest.shards:  # every shard damaged in its second chunk: the first lease a worker gets is bad
        raw = bytearray((data / shard.file).read_bytes())
        raw[2048 + 10] ^= 0xFF
        (data / shard.file).write_bytes(bytes(raw))
    coordinator = start_coordinator(data=data, lease_seconds=300)
    worker = start_worker(coordinator, tmp_path, "w1", "--data", str(tmp_path / "empty"))
    assert worker.wait(timeout=180) != 0
    log = (tmp_path / "w1.log").read_text()
    assert "do not match the manifest's hash" in log and "tried 2 times" in log and "nothing of it was trained" in log
    with coordinator.sessions()() as session:
        leases = session.scalars(select(Lease)).all()
    assert leases and all(lease.state == "released" for lease in leases), [lease.state for lease in leases]
    bad_chunks = [p for p in chunk_files(tmp_path / "empty") if p.name == "00000001.chunk"]
    assert bad_chunks == []  # nothing unverified is kept
    wait_for(lambda: worker.poll() is not None, 5, "the worker to exit")


def test_a_download_cut_midway_resumes_where_it_stopped(served_corpus, corpus_dir: Path, tmp_path: Path) -> None:
    shard = multi_chunk_shards(corpus_dir)[0]
    source = UrlSource(served_corpus.url, block_bytes=1024)  # one Range request per 1 KiB
    store = open_store(run_config_for(corpus_dir), tmp_path / "cache", source, cache_bytes=0)
    served_corpus.cut = (len(served_corpus.ranges) + 4, 500)  # the 4th shard request dies after 500 bytes
    tokens = store.tokens(lease_of(shard, 0, 3 * 1024))  # chunks 0..2: bytes [0, 6144)
    assert tokens.tolist() == read_tokens(corpus_dir / shard.file, shard.dtype, 0, 3 * 1024).tolist()
    shard_requests = [wanted for path, wanted in served_corpus.ranges if path.endswith(shard.file)]
    assert shard_requests[:4] == ["bytes=0-1023", "bytes=1024-2047", "bytes=2048-3071", "bytes=3072-4095"]
    assert shard_requests[4] == "bytes=3072-4095", shard_requests  # resumed at the block it lost, not from 0
    assert len(shard_requests) == 7
    assert len(chunk_files(tmp_path / "cache")) == 3 and not list((tmp_path / "cache").glob("chunks/*/*.part"))


def test_the_cache_cap_evicts_the_least_recently_read_chunks(corpus_dir: Path, tmp_path: Path) -> None:
    shards = multi_chunk_shards(corpus_dir)[:3]
    cap = 4 * 2048
    store = open_store(run_config_for(corpus_dir), tmp_path / "cache", UrlSource(f"file://{corpus_dir}"), cache_bytes=cap)
    for shard in shards:
        store.tokens(lease_of(shard, 0, 2048))  # two chunks each
        assert store.cache.bytes <= cap
    assert store.cache.evictions == 2
    kept = {p.parent.name for p in chunk_files(tmp_path / "cache")}
    assert kept == {shards[1].sha256, shards[2].sha256}  # the first shard's, read least recently, went
    again = store.tokens(lease_of(shards[0], 0, 2048))  # evicted chunks come back, still verified
    assert again.tolist() == read_tokens(corpus_dir / shards[0].file, shards[0].dtype, 0, 2048).tolist()
    small = ShardStore(tmp_path / "small", store.manifest, store.source, cache_bytes=3 * 2048)
    with pytest.raises(ShardUnavailable, match="--cache-bytes 6144 cannot hold"):
        small.tokens(lease_of(shards[1], 0, 4096))  # four chunks in one lease: more than the cap


def test_a_damaged_cached_chunk_is_fetched_again(corpus_dir: Path, tmp_path: Path) -> None:
    shard = multi_chunk_shards(corpus_dir)[0]
    store = open_store(run_config_for(corpus_dir), tmp_path / "cache", UrlSource(f"file://{corpus_dir}"), cache_bytes=0)
    expected = store.tokens(lease_of(shard, 0, 1024)).tolist()
    [chunk] = chunk_files(tmp_path / "cache")
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # the disk rotted
    fresh = ShardStore(tmp_path / "cache", store.manifest, store.source)
    assert fresh.tokens(lease_of(shard, 0, 1024)).tolist() == expected


def test_bad_sources_and_bad_leases_are_refused_with_what_to_do(corpus_dir: Path, tmp_path: Path) -> None:
    config = run_config_for(corpus_dir)
    with pytest.raises(ShardUnavailable, match="does not exist .*404"):
        open_store(config, tmp_path / "a", UrlSource(f"file://{tmp_path}/nowhere"), 0)
    with pytest.raises(ShardUnavailable, match="describes corpus .* the data_url serves another corpus"):
        open_store(pb.RunConfig(**{**{f.name: getattr(config, f.name) for f, _ in config.ListFields()},
                                   "corpus_root_hash": "f" * 64}), tmp_path / "b", UrlSource(f"file://{corpus_dir}"), 0)
    with pytest.raises(ShardUnavailable, match="tokenizer does not match"):
        open_store(pb.RunConfig(tokenizer_json=b"{}", tokenizer_sha256="0" * 64), tmp_path / "c",
                   UrlSource(f"file://{corpus_dir}"), 0)
    store = open_store(config, tmp_path / "d", UrlSource(f"file://{corpus_dir}"), 0)
    shard = multi_chunk_shards(corpus_dir)[0]
    forged = lease_of(shard, 0, 10)
    forged.shard_sha256 = "0" * 64
    with pytest.raises(ShardUnavailable, match="does not list as such"):
        store.tokens(forged)
    with pytest.raises(ShardUnavailable, match="outside shard"):
        store.tokens(lease_of(shard, 4000, shard.tokens + 1))
    escaping = lease_of(shard, 0, 10)
    escaping.shard_file = "../../etc/passwd"
    with pytest.raises(ShardUnavailable, match="not a plain file name"):
        ShardStore(tmp_path / "e").tokens(escaping)


def test_a_server_without_range_support_is_named_as_such(corpus_dir: Path, tmp_path: Path) -> None:
    for served in serve_files(corpus_dir, honour_ranges=False):
        store = open_store(run_config_for(corpus_dir), tmp_path / "cache", UrlSource(served.url), 0)
        shard = multi_chunk_shards(corpus_dir)[0]
        with pytest.raises(ShardUnavailable, match="honours HTTP Range requests"):
            store.tokens(lease_of(shard, 1500, 2600))
        assert chunk_files(tmp_path / "cache") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI is root)")
def test_a_full_disk_while_caching_is_named_and_keeps_nothing_half_written(corpus_dir: Path, tmp_path: Path) -> None:
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20k", "tmpfs", str(disk)], check=True)
    try:
        store = open_store(run_config_for(corpus_dir), disk, UrlSource(f"file://{corpus_dir}"), cache_bytes=0)
        shard = multi_chunk_shards(corpus_dir)[0]
        with pytest.raises(ShardUnavailable, match="no space left in .* free some space or lower --cache-bytes"):
            for start in range(0, shard.tokens, 1024):  # 14 KiB of manifest, then 2 KiB chunks until it is full
                store.tokens(lease_of(shard, start, start + 1024))
        leftovers = [p.name for p in disk.rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert all(name.endswith(".chunk") for name in leftovers), leftovers  # no .part, no temp file
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_leases_prefetched_side_by_side_share_their_boundary_chunk_safely(corpus_dir: Path, tmp_path: Path) -> None:
    shards = multi_chunk_shards(corpus_dir)[:2]
    store = open_store(run_config_for(corpus_dir), tmp_path / "cache", UrlSource(f"file://{corpus_dir}"), cache_bytes=0)
    leases = [lease_of(shards[0], 0, 1500), lease_of(shards[0], 1500, 3000), lease_of(shards[1], 0, 3000)]
    fetching = [store.prefetch(lease) for lease in leases]  # the first two both need chunk 1 of the same shard
    try:
        for lease, future in zip(leases, fetching):
            shard = shards[0] if lease.shard_id == shards[0].shard_id else shards[1]
            assert future.result(timeout=60).tolist() == read_tokens(corpus_dir / shard.file, shard.dtype,
                                                                     lease.start, lease.end).tolist()
    finally:
        store.close()
    assert len(chunk_files(tmp_path / "cache")) == 3 + 3 and store.cache.bytes == 6 * 2048
