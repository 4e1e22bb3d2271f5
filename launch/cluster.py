"""Commands and job files for each way of starting ``lmrec train``: torchrun, the deepspeed
launcher, a SLURM batch script and a Kubeflow PyTorchJob.

This module only renders: device choice and the NCCL/gloo defaults live in train's
``compute_init``, which every rank runs whatever started it.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

TRAIN = ["-m", "launch.cli", "train"]


class LaunchError(ValueError):
    pass


def parse_endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--master {value!r}: expected HOST:PORT, e.g. 10.0.0.1:29500")
    return host, int(port)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_gpus(requested: int, where: str) -> None:
    """GPUs asked for on this machine must exist here (rendered job files are checked by their
    scheduler instead: a submit host rarely has the compute nodes' GPUs)."""
    if requested < 0:
        raise LaunchError(f"{where}: the number of GPUs cannot be negative")
    if requested and requested > gpu_count():
        raise LaunchError(f"{where}: {requested} GPUs requested, this machine has {gpu_count()}")


def torchrun_command(
    nproc: int,
    train_args: list[str],
    nnodes: int = 1,
    node_rank: int = 0,
    master: str | None = None,
    max_restarts: int = 0,
    rdzv_timeout_s: int = 900,
    python: str = sys.executable,
) -> list[str]:
    if nproc < 1 or nnodes < 1:
        raise LaunchError("--nproc and --nnodes must be >= 1")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank} is outside [0, {nnodes})")
    command = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max_restarts={max_restarts}"]
    if nnodes == 1 and master is None:
        command += ["--standalone"]
    else:
        if master is None:
            raise LaunchError("--master HOST:PORT is required with --nnodes > 1 (the rendezvous endpoint)")
        host, port = parse_endpoint(master)
        command += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={host}:{port}",
            f"--rdzv_conf=join_timeout={rdzv_timeout_s}",
        ]
    return command + TRAIN + train_args


def deepspeed_command(
    hostfile: Path,
    train_args: list[str],
    num_gpus: int | None = None,
    node_rank: int | None = None,
    master: str | None = None,
    python: str = sys.executable,
) -> list[str]:
    hostfile = Path(hostfile)
    if not hostfile.is_file():
        raise LaunchError(f"--hostfile {hostfile}: no such file")
    hosts = _read_hostfile(hostfile)
    command = [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}"]
    if num_gpus is not None:
        if num_gpus < 1:
            raise LaunchError("--num-gpus must be >= 1")
        command.append(f"--num_gpus={num_gpus}")
    if node_rank is not None:
        if master is None:
            raise LaunchError("--node-rank needs --master HOST:PORT (without ssh, rank 0's address is not looked up)")
        # Without ssh every node runs the launcher itself and says which host of the file it is.
        if not 0 <= node_rank < len(hosts):
            raise LaunchError(f"--node-rank {node_rank} is outside the {len(hosts)} hosts of {hostfile}")
        command += ["--no_ssh", f"--node_rank={node_rank}"]
    if master is not None:
        host, port = parse_endpoint(master)
        command += [f"--master_addr={host}", f"--master_port={port}"]
    return command + ["--module", "launch.cli", "train"] + train_args


def _read_hostfile(path: Path) -> list[str]:
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise LaunchError(f"{path}:{number}: expected 'HOSTNAME slots=N', got {line!r}")
        hosts.append(parts[0])
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    return hosts


@dataclass
class SlurmJob:
    nodes: int
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "lmrec"
    output_root: str = "runs/slurm"
    port: int = 29500
    preempt_notice_s: int = 120  # SIGTERM this long before the time limit: checkpoint, then requeue
    python: str = sys.executable
    workdir: str = field(default_factory=lambda: str(Path.cwd()))

    def __post_init__(self):
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise LaunchError("--gpus-per-node cannot be negative")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError("--cpus-per-task must be >= 1")

    def render(self, train_args: list[str]) -> str:
        """The sbatch script: one task per node, each starting torchrun for that node's GPUs (or
        one CPU process), the c10d rendezvous on the allocation's first node."""
        directives = [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            "--ntasks-per-node=1",
            f"--output={self.output_root}/%x-%j.out",  # slurm opens it before the script runs
            "--open-mode=append",  # a requeued run appends to the same log
            f"--signal=TERM@{self.preempt_notice_s}",
            "--requeue",
        ]
        if self.gpus_per_node:
            directives.append(f"--gpus-per-node={self.gpus_per_node}")
        for name, value in (
            ("cpus-per-task", self.cpus_per_task),
            ("partition", self.partition),
            ("time", self.time),
            ("account", self.account),
        ):
            if value is not None:
                directives.append(f"--{name}={value}")
        nproc = self.gpus_per_node or 1
        run_dir = f"{self.output_root}/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}"
        train = " ".join(shlex.quote(a) for a in train_args)
        torchrun = (
            f"{shlex.quote(self.python)} -m torch.distributed.run --nnodes=$SLURM_NNODES --nproc_per_node={nproc} "
            f"--rdzv_id=$SLURM_JOB_ID --rdzv_backend=c10d --rdzv_endpoint=$head_addr:{self.port} "
            f"-m launch.cli train {train} --set output.dir={run_dir} --resume auto"
        )
        lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives]
        lines += [
            "# Rendered by `lmrec launch slurm`. A requeued job keeps its ID, so it finds its own",
            "# checkpoints in the same run directory and resumes (--resume auto).",
            "set -euo pipefail",
            f"cd {shlex.quote(self.workdir)}",
            f"mkdir -p {run_dir}",
            'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            'export head_addr=$(scontrol show node "$head_node" -o | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
            'echo "lmrec: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
            'rendezvous $head_addr"',
            # srun forwards the preemption SIGTERM to each task; exec makes torchrun that task.
            f"srun --kill-on-bad-exit=1 bash -c {shlex.quote('exec ' + torchrun)}",
        ]
        return "\n".join(lines) + "\n"


def pytorchjob(
    name: str,
    image: str,
    nodes: int,
    gpus_per_node: int,
    train_args: list[str],
    cpus: str | None = None,
    memory: str | None = None,
    claim: str = "lmrec-runs",
    mount: str = "/runs",
    grace_s: int = 90,
    namespace: str | None = None,
) -> dict:
    """A Kubeflow PyTorchJob (kubeflow.org/v1): a master and nodes - 1 workers running torchrun
    with the operator's MASTER_ADDR/MASTER_PORT/RANK, checkpoints on a shared volume, and a grace
    period that covers the checkpoint deadline after SIGTERM."""
    if nodes < 1 or gpus_per_node < 0:
        raise LaunchError("--nodes must be >= 1 and --gpus-per-node >= 0")
    nproc = gpus_per_node or 1
    train = " ".join(shlex.quote(a) for a in train_args)
    command = (
        f"exec python -m torch.distributed.run --nnodes={nodes} --nproc_per_node={nproc} --node_rank=$RANK "
        f"--master_addr=$MASTER_ADDR --master_port=$MASTER_PORT -m launch.cli train {train} "
        f"--set output.dir={mount}/{name} --resume auto"
    )
    limits: dict = {}
    if gpus_per_node:
        limits["nvidia.com/gpu"] = gpus_per_node
    if cpus:
        limits["cpu"] = cpus
    if memory:
        limits["memory"] = memory

    def replica(count: int) -> dict:
        container = {
            "name": "pytorch",  # the training operator looks for this container name
            "image": image,
            "command": ["bash", "-c", command],
            "volumeMounts": [{"name": "runs", "mountPath": mount}],
        }
        if limits:
            container["resources"] = {"limits": dict(limits), "requests": dict(limits)}
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": grace_s,
                    "containers": [container],
                    "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": claim}}],
                }
            },
        }

    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata,
        "spec": {"pytorchReplicaSpecs": specs},
    }
