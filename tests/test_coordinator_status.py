"""GetStatus is public: a page of workers from a shared snapshot, never a scan per caller."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from coordinator import status as status_module
from coordinator.status import DEFAULT_PAGE, StatusCache, StatusPageError
from coordinator.store import Worker, open_engine, session_factory, sqlite_url
from essaim.processes import essaim_command
from protocol import essaim_pb2 as pb
from support import Clock

WORKERS = 5000


def add_workers(sessions: sessionmaker[Session], count: int, live_every: int = 2) -> None:
    """`count` workers straight into the store; one in `live_every` seen just now, the others long gone."""
    now = time.time()
    with sessions.begin() as session:
        session.add_all(
            Worker(id=f"w{i:06d}", public_key=bytes(32), name=f"worker-{count - i:05d}", institution=f"lab-{i % 7}",
                   device="cpu", registered_at=now, last_seen=now if i % live_every == 0 else now - 3600,
                   tokens_per_second=10.0)
            for i in range(count)
        )


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    made = session_factory(open_engine(sqlite_url(tmp_path / "coordinator.db")))
    add_workers(made, WORKERS)
    return made


def cache(sessions: sessionmaker[Session], clock: Clock, page_max: int = 500) -> StatusCache:
    return StatusCache(sessions, "run", total_rounds=10, live_within_seconds=15, page_max=page_max, clock=clock)


def test_a_reply_lists_one_page_of_workers_by_name_with_the_networks_totals(sessions) -> None:
    reply = cache(sessions, Clock(1000.0)).reply(pb.StatusRequest())
    assert len(reply.workers) == DEFAULT_PAGE
    assert [w.name for w in reply.workers] == [f"worker-{n:05d}" for n in range(1, DEFAULT_PAGE + 1)]
    assert (reply.workers_total, reply.live_workers) == (WORKERS, WORKERS // 2)
    assert reply.tokens_per_second == pytest.approx(10.0 * WORKERS // 2)  # every live worker, not the page's


def test_pages_follow_each_other_without_overlap_and_the_last_one_is_short(sessions) -> None:
    status = cache(sessions, Clock(1000.0))
    first = status.reply(pb.StatusRequest(worker_offset=0, worker_limit=300))
    second = status.reply(pb.StatusRequest(worker_offset=300, worker_limit=300))
    assert first.workers[-1].name == "worker-00300" and second.workers[0].name == "worker-00301"
    last = status.reply(pb.StatusRequest(worker_offset=WORKERS - 10, worker_limit=300))
    assert [w.name for w in last.workers] == [f"worker-{n:05d}" for n in range(WORKERS - 9, WORKERS + 1)]
    assert len(status.reply(pb.StatusRequest(worker_offset=WORKERS)).workers) == 0


def test_a_page_larger_than_the_coordinators_limit_is_refused_with_what_to_ask_for(sessions) -> None:
    status = cache(sessions, Clock(1000.0), page_max=100)
    with pytest.raises(StatusPageError, match=r"worker_limit 101 is more than .* \(100, status_page_max.*worker_offset"):
        status.reply(pb.StatusRequest(worker_limit=101))
    with pytest.raises(StatusPageError, match="must be 0 or positive"):
        status.reply(pb.StatusRequest(worker_offset=-1))
    assert len(status.reply(pb.StatusRequest(worker_limit=100)).workers) == 100
    assert len(status.reply(pb.StatusRequest()).workers) == DEFAULT_PAGE  # the default page fits under the limit


def test_callers_inside_the_cache_window_share_one_reading_of_the_database(sessions) -> None:
    clock = Clock(1000.0)
    status = cache(sessions, clock)
    for offset in range(0, 1000, 50):  # different pages, one snapshot
        status.reply(pb.StatusRequest(worker_offset=offset))
    assert status.recomputations == 1
    with sessions.begin() as session:
        session.add(Worker(id="late", public_key=bytes(32), name="aaa-late", institution="lab", device="cpu",
                           registered_at=time.time(), last_seen=time.time()))
    clock.now += 0.5
    assert status.reply(pb.StatusRequest()).workers_total == WORKERS  # not read again yet
    clock.now += status.max_age_seconds
    reply = status.reply(pb.StatusRequest())
    assert status.recomputations == 2 and reply.workers_total == WORKERS + 1 and reply.workers[0].name == "aaa-late"


def test_a_slow_reading_is_kept_ten_times_as_long_as_it_took(sessions, monkeypatch) -> None:
    clock = Clock(1000.0)
    read_network = status_module._read_network

    def slow_reading(*args: object) -> object:
        clock.now += 3.0  # the database takes 3 s to read
        return read_network(*args)

    monkeypatch.setattr(status_module, "_read_network", slow_reading)
    status = cache(sessions, clock)
    status.reply(pb.StatusRequest())
    clock.now += 26.9  # 29.9 s after the reading began: inside 10 x 3 s
    status.reply(pb.StatusRequest())
    assert status.recomputations == 1
    clock.now += 0.1
    status.reply(pb.StatusRequest())
    assert status.recomputations == 2


def test_essaim_status_shows_a_page_and_says_how_many_workers_there_are(start_coordinator) -> None:
    coordinator = start_coordinator()
    add_workers(coordinator.sessions(), WORKERS)
    env = {"COLUMNS": "200", "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(essaim_command("status", "--coordinator", coordinator.address, "--once",
                                          "--workers-page", "20", "--workers-offset", "40"),
                           capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"{WORKERS // 2}/{WORKERS} workers live" in shown.stdout
    assert "showing 20 of 5,000 workers, from #41 (by name)" in shown.stdout
    assert "worker-00041" in shown.stdout and "worker-00060" in shown.stdout and "worker-00061" not in shown.stdout

    refused = subprocess.run(essaim_command("status", "--coordinator", coordinator.address, "--once",
                                            "--workers-page", "501"), capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 2
    assert "INVALID_ARGUMENT" in refused.stderr and "ask for at most 500" in refused.stderr
