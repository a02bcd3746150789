"""What the coordinator does for workers on other machines: serve corpus files, dial ports back."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from coordinator.corpus_files import CorpusFileError, CorpusFiles
from coordinator.reachability import dial_back, peer_host
from model.shards import Manifest


def test_corpus_files_serve_ranges_of_listed_files_only_and_cap_concurrent_downloads(corpus_dir: Path) -> None:
    manifest = Manifest.load(corpus_dir / "manifest.json")
    files = CorpusFiles(corpus_dir, manifest, max_concurrent_reads=1)
    shard = manifest.shards[0]
    assert b"".join(files.read(shard.file, 10, 100)) == (corpus_dir / shard.file).read_bytes()[10:110]
    for name in ("coordinator.db", "tokenizer/tokenizer.json", "../manifest.json"):
        with pytest.raises(CorpusFileError, match="not a file of this run's corpus"):
            files.read(name, 0, 0)
    with pytest.raises(CorpusFileError, match="outside"):
        files.read(shard.file, 0, shard.size_bytes + 1)
    downloading = files.read(shard.file, 0, 0)
    next(downloading)  # one download under way holds the only slot
    with pytest.raises(CorpusFileError, match="serving 1 downloads already") as busy:
        files.read("manifest.json", 0, 0)
    assert busy.value.kind == "busy"
    downloading.close()  # the worker hung up: the slot is free again
    assert b"".join(files.read("manifest.json", 0, 0)) == (corpus_dir / "manifest.json").read_bytes()


def test_a_dial_back_counts_only_a_listener_that_answers_with_the_token() -> None:
    def listen(answer: bytes) -> tuple[socket.socket, int]:
        server = socket.create_server(("127.0.0.1", 0))

        def reply() -> None:
            connection, _ = server.accept()
            with connection:
                connection.sendall(answer)
        threading.Thread(target=reply, daemon=True).start()
        return server, server.getsockname()[1]

    token = b"t" * 16
    right, port = listen(token)
    with right:
        assert dial_back("127.0.0.1", port, token) == ""
    impostor, port = listen(b"SSH-2.0-OpenSSH\r\n")
    with impostor:
        assert "something else answers" in dial_back("127.0.0.1", port, token)
    assert "cannot be reached" in dial_back("127.0.0.1", port, token, timeout=1.0)  # closed now
    assert peer_host("ipv4:10.0.0.2:5432") == "10.0.0.2" and peer_host("ipv6:[::1]:5432") == "::1"
