"""Process setup: the one place that reads the launcher's environment and picks the device.

torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; SLURM's srun sets SLURM_* instead. Without any of them, lmrec runs as
one plain process (a process group of one, so TorchRec and DeepSpeed need no special case).
GPUs present: CUDA + NCCL, one device per local rank. Otherwise: CPU + gloo.
"""

from __future__ import annotations

import ctypes
import os
import random
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ComputeEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env() -> dict[str, str]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # The deepspeed launcher says LOCAL_SIZE where torchrun says LOCAL_WORLD_SIZE.
        return {"LOCAL_WORLD_SIZE": env["LOCAL_SIZE"]} if "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env else {}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1"),
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def _keep_freed_memory() -> None:
    """Stops glibc from returning every large freed block to the kernel. A training step allocates
    and frees the same few hundred MB (logits, activations); with glibc's defaults each block is a
    fresh mmap that is page-faulted in again, which cost a third of every CPU step here."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 2**31 - 1)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_top_pad, 1 << 28)


def _init_process_group(backend: str, rank: int, world: int, timeout: timedelta) -> None:
    """The env:// rendezvous, with every key under the launcher's restart count. torchrun keeps
    one store across elastic restarts; without the prefix, restarted ranks can read the failed
    attempt's gloo/NCCL addresses and never connect (pytorch/pytorch#135712)."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"lmrec/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def compute_init(seed: int = 0, timeout_s: float = 600.0) -> ComputeEnv:
    """Initialises the process group and seeds every generator; call once per process."""
    _keep_freed_memory()
    os.environ.update(_launcher_env())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce used only by its
        # inference kernels: ~30 s and a compiler on every fresh machine, for nothing here.
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    if not dist.is_initialized():
        _init_process_group(backend, rank, world, timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts the group above
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # One line per rank: where each rank runs is the first question about any multi-node job.
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    # One write, so that the ranks' lines do not interleave.
    sys.stdout.write(f"lmrec: rank {rank}/{world} (local {local_rank}/{local_world}) on node {node}, {backend}\n")
    sys.stdout.flush()
    return ComputeEnv(rank, world, local_rank, local_world, device, backend)


def compute_cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
