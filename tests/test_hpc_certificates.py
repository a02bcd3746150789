"""`essaim hpc submit --institution-key`: each task joins with an identity and a certificate made on the login node."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.hpc import SlurmError, SlurmJob, TaskCertificates, render_sbatch
from protocol.certificates import check, parse
from protocol.identity import Identity


def worker_command(script: str) -> list[str]:
    [line] = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(shlex.split(line)[-1])[1:]  # what `bash -c 'exec ...'` runs


def test_each_task_joins_with_its_own_certified_identity_and_the_institution_key_stays_on_the_login_node(
    tmp_path: Path,
) -> None:
    centre = Ed25519PrivateKey.generate()
    certificates = TaskCertificates.for_submission(tmp_path / "run", "GENCI", centre, days=2)
    job = SlurmJob(coordinator="c:1", partition="p", nodes=2, time="01:00:00", workdir=tmp_path / "run",
                   tasks_per_node=3, institution="GENCI", certificates=certificates)
    worker = worker_command(render_sbatch(job, essaim=["essaim"]))
    assert worker[worker.index("--identity") + 1] == f"{certificates.directory}/task-$SLURM_PROCID.key"
    assert worker[worker.index("--certificate") + 1] == f"{certificates.directory}/task-$SLURM_PROCID.cert"
    assert "--trust-class" not in worker  # the certificate grants the class

    certificates.write(job.nodes * job.tasks)
    admitted = {"GENCI": parse(certificates.certificate("0").read_bytes()).institution_key}
    for task in map(str, range(6)):
        identity = Identity.load_or_create(certificates.identity(task))
        certificate = parse(certificates.certificate(task).read_bytes())
        check(certificate, identity.public_key, admitted, time.time())
        assert certificate.trust_class == "hpc" and certificate.expires_at > time.time() + 86400
    assert sorted(p.name for p in certificates.directory.iterdir()) == sorted(
        [f"task-{i}.key" for i in range(6)] + [f"task-{i}.cert" for i in range(6)])
    other = TaskCertificates.for_submission(tmp_path / "run", "GENCI", centre, days=2)
    assert other.directory != certificates.directory  # two submissions never share an identity


def test_without_an_institution_key_the_tasks_claim_nothing_and_join_as_volunteers(tmp_path: Path) -> None:
    worker = worker_command(render_sbatch(SlurmJob(coordinator="c:1", partition="p", nodes=1, time="01:00:00",
                                                   workdir=tmp_path)))
    assert "--certificate" not in worker and "--institution" not in worker and "--trust-class" not in worker


def test_an_institution_key_without_the_institutions_name_is_refused_with_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(SlurmError, match="--institution-key needs --institution NAME"):
        TaskCertificates.for_submission(tmp_path, "", Ed25519PrivateKey.generate(), days=1)
