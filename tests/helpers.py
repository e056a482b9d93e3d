"""Helpers for running code in subprocesses. Megatron-Core runs in subprocesses (torchrun + gloo), never in the pytest process:
the CPU emulation is process-wide, and parallel layouts need several processes anyway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # several ranks share 2 cores
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        PAUSE_MEGATRON_CPU="1",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


def torchrun(script: str | Path, *args: str, nproc: int = 1, timeout: int = 600, check: bool = True,
             **env: str) -> subprocess.CompletedProcess:
    """Run `script` (a path, or `-m module`) under torchrun with `nproc` local ranks on gloo."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", script[3:]] if str(script).startswith("-m ") else [str(script)]
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def python(*args: str, timeout: int = 600, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(**env), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)
