"""A real single-node Slurm (Debian's slurm-wlm + munge) for tests, on 127.0.0.1, stopped by the fixture.

Recipe from FIELD-NOTES: a private munged (own key and socket, as user munge),
`slurmctld -i` and `slurmd -N <short hostname>`, with the settings that let Slurm
run without systemd, accounting or cgroups. Client commands find it through
SLURM_CONF, which ``env`` provides.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def slurm_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(name) or Path(f"/usr/sbin/{name}").exists() for name in DAEMONS)



class SlurmCluster:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="essaim-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self._processes: list[subprocess.Popen[bytes]] = []
        self._start_munge()
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(self._slurm_conf())
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._processes.append(self._daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld"))
        self._processes.append(self._daemon(["/usr/sbin/slurmd", "-D", "-N", self.host, "-f", str(self.conf)], "slurmd"))
        self._wait_for_idle_node()

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        sockets = self.root / "munge-socket"  # munged wants its socket's directory open to all
        sockets.mkdir(mode=0o755)
        shutil.chown(sockets, "munge", "munge")
        self.munge_socket = sockets / "munge.socket"
        subprocess.run(
            ["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}"],
            check=True, capture_output=True, timeout=30,
        )
        self._munge_pid_file = munge / "munged.pid"

    def _slurm_conf(self) -> str:
        for directory in ("state", "spool"):
            (self.root / directory).mkdir()
        cpus = os.cpu_count() or 1
        # Jobs ask for memory (sbatch --mem-per-cpu): the node offers what the machine has, less some headroom.
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        return "\n".join([
            "ClusterName=essaim-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root / 'jobcomp.txt'}",
            "SchedulerParameters=batch_sched_delay=0",
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ])

    def _daemon(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.out", "wb")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SLURM_CONF": str(self.conf)},
                                start_new_session=True)

    def _wait_for_idle_node(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run("sinfo", "-h", "-o", "%t")
            if result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"Slurm did not come up: {self.logs()}")

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(command), capture_output=True, text=True, env=self.env, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")))

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self._processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        try:
            os.kill(int(self._munge_pid_file.read_text()), 15)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
