"""Starting Essaim roles as child processes and stopping them with everything they spawned.

Each child gets its own session (hence process group): hivemind's DHT process,
averagers and p2pd outlive a killed parent, so a stop signals the whole group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def essaim_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "essaim", *args]


def start_role(args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
               wrapper: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start `essaim ARGS...` in a new session, its output appended to log_path.

    ``wrapper`` runs it through a command that execs it, e.g. ``ip netns exec NS`` (another host).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: IO[bytes] = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [*wrapper, *essaim_command(*args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    finally:
        log.close()  # the child holds its own descriptor


def wait_for_ready_file(process: subprocess.Popen[bytes], path: Path, log_path: Path, timeout: float) -> dict:
    """Wait until a role writes its ready file (JSON) and return it; fail early if the role dies."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            state = "exited" if process.poll() is not None else f"was not ready after {timeout:.0f} s"
            role = " ".join(process.args[process.args.index("essaim") + 1:])
            raise RuntimeError(f"`{role}` {state}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def stop_group(process: subprocess.Popen[bytes], grace_seconds: float = 20.0) -> None:
    """SIGTERM the child, wait for it and its group to exit, then SIGKILL whatever is left of the group.

    Only the leader gets SIGTERM: it shuts its own children down (hivemind's DHT and
    p2pd), which fails if they are terminated under it at the same moment.
    """
    pgid = process.pid  # session leader: its pid is the group id
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None and not group_alive(pgid):
            return
        time.sleep(0.1)
    kill_group(process)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    _signal_group(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def terminate_group(process: subprocess.Popen[bytes], grace_seconds: float = 10.0) -> None:
    """SIGTERM the child's group and the groups of all its descendants, then SIGKILL whatever is left.

    For Flower's SuperLink and SuperNodes: they start `flower-superexec` in a session of
    its own, which starts the app processes; signalling the child's group alone leaves them.
    The tree is read before any signal, while every descendant still has its parent.
    """
    groups = {process.pid} | {_group_of(pid) for pid in descendants(process.pid)} - {0}
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None and not any(group_alive(pgid) for pgid in groups):
            return
        time.sleep(0.1)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)
    kill_group(process)


def descendants(pid: int) -> list[int]:
    """Every live process below pid in the process tree, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def _group_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return 0
