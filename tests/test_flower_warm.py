"""The warm site runtime's parts on their own: forked apps, the bounded idle poll, sooner object pulls.

The whole runtime runs in tests/test_e2e_finetune.py (every site there is warm).
"""

from __future__ import annotations

import multiprocessing.forkserver
import time
from pathlib import Path

import pytest

from essaim.flower_warm import BoundedSleep, ForkingExecutor, shorten_idle_poll
from protocol.flower_pulls import retry_object_pulls_sooner


def test_forked_apps_each_draw_their_own_random_numbers(tmp_path: Path) -> None:
    # Every child of one forkserver starts from its memory: numpy's generator (which the
    # training stack's imports set) and torch's would repeat, and a site's DP noise with them.
    executor = ForkingExecutor()
    executor.warm_up()
    from forked_draws import write_draws

    processes = [executor.fork(write_draws, str(tmp_path / f"draw-{i}")) for i in range(3)]
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    draws = [(tmp_path / f"draw-{i}").read_text().split() for i in range(3)]
    assert len({numpy_draw for numpy_draw, _ in draws}) == 3
    assert len({torch_draw for _, torch_draw in draws}) == 3
    executor.reconcile()
    forkserver_pid = multiprocessing.forkserver._forkserver._forkserver_pid
    executor.close()
    assert forkserver_pid and not Path(f"/proc/{forkserver_pid}").exists()  # stopped and reaped


def test_the_supernodes_sleeps_are_bounded_and_the_rest_of_time_is_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)  # restored after the test
    shorten_idle_poll(0.01)
    assert isinstance(loop.time, BoundedSleep) and loop.time.longest == 0.01
    started = time.monotonic()
    loop.time.sleep(3)  # Flower's idle wait
    assert time.monotonic() - started < 1.0
    assert loop.time.monotonic is time.monotonic
    monkeypatch.setattr(loop, "time", object())  # a Flower whose loop sleeps otherwise
    with pytest.raises(RuntimeError, match="update essaim.flower_warm"):
        shorten_idle_poll()


def test_object_pulls_retry_sooner_and_other_functions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    retry_object_pulls_sooner(http_grid, "pull_objects", first=0.03, longest=0.3)
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.03, "backoff_cap": 0.3}
    with pytest.raises(RuntimeError, match="not a Flower object pull"):
        retry_object_pulls_sooner(http_grid, "now")
