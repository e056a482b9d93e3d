"""Process-group start (torchrun or Slurm), Megatron parallel state and seeds.

On a machine without a GPU, the CPU emulation is switched on and gloo is used, so that the same
Megatron-Core code paths run on a laptop as on a cluster (NCCL).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch

from pause_megatron import cpu_emulation
from pause_megatron.config import Config
from pause_megatron.kernels import use_cuda  # noqa: F401  (callers ask the runtime)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


JOB_PORT_BASE, JOB_PORTS = 20000, 12000  # Slurm jobs' rendezvous ports: 20000-31999


def dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read rank and rendezvous from torchrun's variables, else Slurm's (one task per rank), else single."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        job_id = int(environ.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(environ["SLURM_NTASKS"]),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"]),
            # A port per job (jobs sharing a first node collide only if their ids differ by a multiple of
            # JOB_PORTS: then set MASTER_PORT), below Linux's ephemeral
            # range (32768-60999), where any process's outgoing connection may hold it.
            master_port=int(environ.get("MASTER_PORT", JOB_PORT_BASE + job_id % JOB_PORTS)),
        )
    # A lone process (python -m ..., a test): any free local port will do.
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                   master_port=int(environ.get("MASTER_PORT", 0)) or _free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env(environ: Mapping[str, str] = os.environ) -> int:
    return dist_env(environ).world_size


def init_distributed(cfg: Config, *, timeout_minutes: int = 30) -> DistEnv:
    """Start the process group and Megatron's parallel state for `cfg.parallel`; seed every RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    env = dist_env()
    cuda = use_cuda()
    if not cuda and os.environ.get("PAUSE_REQUIRE_GPU") == "1" and os.environ.get("PAUSE_MEGATRON_CPU") != "1":
        # A recipe's GPU stage: running on the CPU emulation instead would be silently wrong (and slow).
        raise SystemExit(f"error: this job asked for GPUs but rank {env.rank} on "
                         f"{os.environ.get('SLURMD_NODENAME') or 'this node'} sees none (torch.cuda.is_available() "
                         "is False); set launch.gpus_per_node=0 to run on the CPU on purpose")
    if not cuda:
        cpu_emulation.enable()
    else:
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
            virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline,
        )
    # As Megatron-LM does: each pipeline stage its own seed (100 apart), so that stages holding the same kind of
    # layers do not start from the same weights. Virtual stages of one rank differ because they are built one
    # after another from that rank's generator. TP and DP ranks of a stage share the seed: with CPU
    # initialisation every TP rank draws the full weight and keeps its slice, and DP replicas must agree.
    seed = cfg.train.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return env


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group (end of a run or a test)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    """The device tensors go to: the local GPU, or the CPU under the emulation."""
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")
