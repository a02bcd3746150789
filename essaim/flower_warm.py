"""A fine-tuning site's Flower runtime, warm: a SuperNode that notices messages at once and apps that start in milliseconds.

Stock Flower 1.41 makes every message of a round pay three waits and a cold start:
the SuperNode looks for messages every 3 s when idle, its SuperExec looks for
tasks every second, and each message runs in a fresh `flwr-clientapp` process that
imports Flower and, to train, torch, transformers and peft (~4 s, more while the
sites share the cores). A SecAgg+ round is four messages per site.

Here the SuperNode is Flower's own, with its idle wait cut to IDLE_POLL_SECONDS
(Flower has no setting for it: its loop's `time.sleep` is bounded), and its
SuperExec is Flower's own loop with one change: its executor forks each
`flwr-clientapp` from a multiprocessing forkserver that imported the training
stack once, when the site started. The app process is still one per message, as
Flower isolates them, with the same command line and Runtime API; it only skips
the interpreter start and the imports. Two things a fork changes are put back:
each child reseeds numpy and torch, and retries a message object its SuperNode
does not hold yet within milliseconds (protocol.flower_pulls).

    python -m essaim.flower_warm supernode FLOWER_SUPERNODE_ARGS...   (essaim finetune site execs this)
    python -m essaim.flower_warm superexec --runtime-api-address HOST:PORT --parent-pid PID
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import ModuleType

from protocol.flower_pulls import retry_object_pulls_sooner

IDLE_POLL_SECONDS = 0.1  # how often an idle SuperNode asks the SuperLink for messages (Flower: 3 s)
TASK_POLL_SECONDS = "0.05"  # how often the SuperExec asks its SuperNode for tasks (Flower: 1 s; its own setting)
# Imported once by the forkserver, so that no message's process pays for them.
PRELOAD = ["flwr.supernode.cli", "flwr.supernode.runtime.run_clientapp", "worker.finetune_client",
           "worker.finetune_site", "peft"]


class BoundedSleep(ModuleType):
    """The `time` module as one Flower module sees it, with sleeps cut to at most `longest` seconds."""

    def __init__(self, longest: float) -> None:
        super().__init__("time")
        self.longest = longest

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.longest))


def shorten_idle_poll(seconds: float = IDLE_POLL_SECONDS) -> None:
    """Make the SuperNode's message loop wait `seconds` instead of 3 s between empty pulls (and 0.5 s for replies)."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:  # Flower moved its loop: fail loudly rather than run slow unnoticed
        raise RuntimeError("flwr.supernode.start_client_internal no longer sleeps through `time`: "
                           "update essaim.flower_warm for this Flower version")
    loop.time = BoundedSleep(seconds)  # type: ignore[attr-defined]


def _with_fresh_randomness(target: Callable[..., None], *args: object) -> None:
    """Reseed what a fork copies: every child of one forkserver would otherwise draw the same numbers.

    Python's `random` reseeds itself after a fork; numpy's global generator (set
    by the training stack's imports in the forkserver) and torch's do not. Flower's
    local DP draws its noise from numpy's: unseeded, a site added the same noise in
    every round, and it no longer averaged out (the DP end-to-end test caught it).
    """
    import numpy as np
    import torch

    np.random.seed()  # fresh entropy from the OS
    torch.seed()
    target(*args)


def run_clientapp(argv: list[str]) -> None:
    """A forked `flwr-clientapp` process: Flower's own entry point, given the command line SuperExec built."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as app

    # The SuperNode hands out the task before it holds the message's objects: a cold app
    # never noticed, a forked one asks first and would wait Flower's 1 s + 2 s retries.
    retry_object_pulls_sooner(app, "pull_and_inflate_object_from_tree")
    sys.argv = argv
    flwr_clientapp()


class ForkingExecutor:
    """Flower's SubprocessExecutor, except that ClientApp processes fork from a warm forkserver.

    Other task types (a SuperNode only asks for ClientApps) start as Flower starts them.
    """

    def __init__(self, preload: list[str] = PRELOAD) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self._cold = SubprocessExecutor()
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(preload)
        self._running: list[BaseProcess] = []

    def warm_up(self) -> None:
        """Start the forkserver and its imports now, while the site waits for a run, not in round 1."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):  # type: ignore[no-untyped-def]
        return self._cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                                root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:  # type: ignore[no-untyped-def]
        self._cold.wait_for_capacity(task_type, fab_hash=fab_hash, insecure=insecure,
                                     root_certificates_path=root_certificates_path)

    def launch(self, spec):  # type: ignore[no-untyped-def]
        from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._cold.launch(spec)
        # The command line SubprocessExecutor.launch builds (Flower has no helper for it), from the same tables.
        argv = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address, "--token", spec.token]
        if spec.insecure:
            argv.append("--insecure")
        elif spec.root_certificates_path is not None:
            argv += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            argv.append("--allow-runtime-dependency-installation")
        self.fork(run_clientapp, argv, name=f"flwr-clientapp-{spec.task_id}")
        return LaunchResult.accepted()

    def fork(self, target: Callable[..., None], *args: object, name: str | None = None) -> BaseProcess:
        """Run target(*args) in a process forked from the warm forkserver, with its own random state."""
        process = self._context.Process(target=_with_fresh_randomness, args=(target, *args), name=name)
        process.start()
        self._running.append(process)
        return process

    def reconcile(self) -> None:
        """Forget the app processes that have ended (they are the forkserver's children: it reaps them)."""
        for process in [p for p in self._running if not p.is_alive()]:
            process.close()
            self._running.remove(process)

    def close(self) -> None:
        """End the app processes still running, then the forkserver (it would otherwise live until this process ends)."""
        from multiprocessing import forkserver

        for process in self._running:
            process.terminate()
            process.join(5)
        forkserver._forkserver._stop()  # type: ignore[attr-defined]  # stdlib's own, no public stop before 3.14


def run_superexec(runtime_api_address: str, parent_pid: int | None) -> None:
    """Flower's SuperExec loop for one SuperNode (plaintext Runtime API on loopback), with the forking executor."""
    from flwr.supercore.superexec import run_superexec as superexec

    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_SECONDS)
    executor = ForkingExecutor()
    executor.warm_up()
    if not callable(getattr(superexec, "get_executor", None)):
        raise RuntimeError("flwr's run_superexec no longer builds its executor with get_executor: "
                           "update essaim.flower_warm for this Flower version")
    # Flower 1.41 builds only its subprocess and Kubernetes executors; this is the one seam to hand it ours.
    superexec.get_executor = lambda *args, **kwargs: executor  # type: ignore[attr-defined]
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True, parent_pid=parent_pid)


def run_supernode(flower_args: list[str]) -> None:
    """Flower's SuperNode with `flower_args`, its idle poll shortened and the warm SuperExec beside it."""
    from flwr.supernode.cli import flower_supernode

    parsed, _ = _runtime_address_parser().parse_known_args(flower_args)
    superexec = subprocess.Popen([  # in this process group: stopping the site stops it
        sys.executable, "-m", "essaim.flower_warm", "superexec",
        "--runtime-api-address", f"{parsed.host}:{parsed.port}", "--parent-pid", str(os.getpid()),
    ])
    shorten_idle_poll()
    sys.argv = ["flower-supernode", *flower_args, "--isolation", "process"]
    try:
        flower_supernode()
    finally:
        superexec.terminate()


def _runtime_address_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    return parser


def main(argv: list[str]) -> None:
    if argv[:1] == ["supernode"]:
        run_supernode(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m essaim.flower_warm superexec")
    parser.add_argument("role", choices=["superexec"])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    run_superexec(args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":
    main(sys.argv[1:])
