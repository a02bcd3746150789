"""Flower's processes for a federated fine-tune, offline: the SuperLink, one SuperNode per site, `flwr run`.

Every Flower process gets the settings that keep it off the internet (no
`uv sync` of app dependencies, no telemetry, no update check) and a private
FLWR_HOME. The SuperLink and SuperNodes spawn `flower-superexec` and app
processes: start them in their own session and stop the whole group
(essaim.processes.terminate_group).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from essaim.processes import free_port, start_role
from protocol.transport import TransportError, plaintext_allowed

APP_DIR = Path(__file__).parent / "flower_app"
CONNECTION = "essaim"  # the name `flwr run` is given for the SuperLink in FLWR_HOME/config.toml


def flower_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        # Flower starts flower-superexec and its app processes by name.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def _tool(name: str) -> str:
    """A Flower executable of this environment, whether or not its bin directory is on PATH."""
    return str(Path(sys.executable).parent / name)


def check_plaintext(host: str, tls_given: bool, insecure: bool, tls_options: str) -> None:
    """Flower follows the coordinator's rule: plaintext on loopback, elsewhere only when asked for by name."""
    if not tls_given and not plaintext_allowed(host, insecure):
        raise TransportError(f"{host} is not a loopback address: use TLS ({tls_options}) or pass --insecure "
                             "to send fine-tuning traffic in plaintext")


def superlink_command(workdir: Path, host: str, port: int, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """Flower's TLS options: the certificate and key, and the certificate as its CA (self-signed) unless a CA signed it."""
    tls = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(cert)] if cert and key \
        else ["--insecure"]
    return [_tool("flower-superlink"), *tls, "--database", str(workdir / "state.db"),
            "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]


def supernode_command(superlink: str, runtime_port: int, node_config: dict[str, str],
                      ca_cert: Path | None = None, stock: bool = False) -> list[str]:
    """The site's SuperNode: warm (essaim.flower_warm) unless `stock`, Flower's own with its process per message and polls."""
    config = " ".join(f'{key}="{value}"' for key, value in node_config.items())
    tls = ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    supernode = [_tool("flower-supernode")] if stock else [sys.executable, "-m", "essaim.flower_warm", "supernode"]
    return [*supernode, *tls, "--superlink", superlink, "--port", str(runtime_port), "--host", "127.0.0.1",
            "--node-config", config]


def write_connection(home: Path, superlink: str, ca_cert: Path | None = None) -> None:
    """FLWR_HOME/config.toml naming the SuperLink for `flwr` commands: TLS against ca_cert, else plaintext."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca_cert.resolve()}"\n' if ca_cert else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{superlink}"\n{tls}'
    )


def run_app(superlink: str, home: Path, settings_file: Path, log: Path | None = None, app_dir: Path = APP_DIR,
            ca_cert: Path | None = None) -> int:
    """`flwr run` the fine-tuning app on the SuperLink and stream its logs until the run ends; its exit code."""
    write_connection(home, superlink, ca_cert)
    command = [_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--run-config", f'settings-file="{settings_file}"']
    output = open(log, "ab") if log else None
    try:
        return subprocess.run(command, env=flower_env(home), stdout=output, stderr=subprocess.STDOUT if output else None,
                              stdin=subprocess.DEVNULL).returncode
    finally:
        if output:
            output.close()


def start_superlink(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """`essaim finetune serve` in its own session, its log in WORKDIR.log."""
    return start_role(["finetune", "serve", "--workdir", str(workdir), "--port", str(port)],
                      workdir.with_suffix(".log"), env={"OMP_NUM_THREADS": "1"})


def start_site(superlink: str, name: str, data: Path, checkpoint: Path, workdir: Path,
               *options: str) -> subprocess.Popen[bytes]:
    """`essaim finetune site` in its own session, its log in WORKDIR.log; options such as its floor (--require-secagg)."""
    return start_role(
        ["finetune", "site", "--superlink", superlink, "--name", name, "--data", str(data),
         "--checkpoint", str(checkpoint), "--workdir", str(workdir), *options],
        workdir.with_suffix(".log"), env={"OMP_NUM_THREADS": "1"},
    )


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not listen on port {port}: see {process.args}") from None
            time.sleep(0.2)


def run_local_finetune(settings_file: Path, checkpoint: Path, sites: dict[str, Path], workdir: Path,
                       app_dir: Path = APP_DIR, site_options: dict[str, tuple[str, ...]] | None = None) -> int:
    """A whole fine-tune on 127.0.0.1: a SuperLink, one SuperNode per site (name -> data), `flwr run`.

    site_options: more `essaim finetune site` options by site name (its privacy floor).
    Logs go to WORKDIR/*.log; every process is stopped afterwards. Returns flwr run's exit code.
    """
    from essaim.processes import terminate_group

    port = free_port()
    processes = [start_superlink(workdir / "superlink", port)]
    try:
        wait_listening(port, processes[0], 60)
        for name, data in sites.items():
            processes.append(start_site(f"127.0.0.1:{port}", name, data, checkpoint, workdir / f"site-{name}",
                                        *(site_options or {}).get(name, ())))
        return run_app(f"127.0.0.1:{port}", workdir / "flwr-home", settings_file, workdir / "finetune-run.log", app_dir)
    finally:
        for process in processes:
            terminate_group(process)
