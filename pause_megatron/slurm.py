"""Submitting recipe stages to Slurm: one batch script per stage, run through slurm/common.sh.

Each stage's job script sources `slurm/common.sh` (the launch path the sbatch scripts in slurm/ use) and runs
its command with `run_step`: one srun step for every rank; a step that stopped at the time limit or on
preemption (exit 75, checkpoint saved) requeues the job, which resumes; any other failure ends the job, and
`--kill-on-invalid-dep=yes` then cancels what depends on it. The last line marks the stage done.

Submission is plain `sbatch`: recipe stages are shell commands with per-stage dependencies and resources, which
is what sbatch takes directly. submitit submits pickled Python callables, one executor's resources at a time,
and would run beside (not through) slurm/common.sh; job arrays share one set of resources and their
dependencies are per array, not per stage. Job limits (MaxSubmitJobs) are met by throttling: `recipe run`
submits until `launch.max_jobs` of your jobs are queued and stops; running it again later submits the rest and
never a stage whose job is still queued or running.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from dataclasses import dataclass
from typing import Optional

# Job states in which a job may still run or write (squeue's long names).
ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD"})
COMMON_SH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm", "common.sh")


class SlurmError(RuntimeError):
    pass


COMMENT = "pause-megatron"  # --comment=pause-megatron <identity> <output directory>: a stage's job, found by squeue


def stage_comment(identity: str, out: str) -> str:
    return f"{COMMENT} {identity} {os.path.abspath(out)}"


@dataclass
class Job:
    state: str
    identity: Optional[str] = None  # from the job's comment: the stage identity it runs, and where
    out: Optional[str] = None


def active_jobs() -> dict[str, Job]:
    """Your jobs that are queued or running: job id -> Job. Array elements count one each (-r), hidden
    partitions too (--all). An error if squeue cannot tell (then nothing may be submitted: a stage might be
    running). The user is this process's uid, not $USER (which the environment may set to anything)."""
    user = pwd.getpwuid(os.getuid()).pw_name
    cmd = ["squeue", "-h", "-r", "--all", "-u", user, "-o", "%i %T %k"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{shlex.join(cmd)}: {exc}") from None
    if proc.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    jobs = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1] in ACTIVE:
            comment = parts[2].split(None, 2) if len(parts) == 3 else []
            if len(comment) == 3 and comment[0] == COMMENT:
                jobs[parts[0]] = Job(parts[1], comment[1], comment[2])
            else:
                jobs[parts[0]] = Job(parts[1])
    return jobs


def job_script(*, steps: list[list[str]], mark: list[str], home: str, python: str, cpu: Optional[bool],
               title: str, stop_dir: str, max_requeues: int = 3) -> str:
    """A stage's batch script. `steps`: module and arguments, each one srun step; `mark`: the command that
    marks the stage done. cpu: True runs on the CPU emulation on purpose, False refuses to run without a GPU
    (whatever PAUSE_MEGATRON_CPU the submitting shell exported), None (data, report) has no Megatron rank.
    max_requeues: how many times in a row the job is requeued after a stop that saved no progress; stop_dir:
    where run_step keeps what a stopped step saved (the stage's folder)."""
    if not os.path.exists(COMMON_SH):
        raise SlurmError(f"{COMMON_SH} not found: the Slurm executor runs stages through the project checkout's "
                         "slurm/common.sh")
    lines = ["#!/bin/bash", f"# {title}", "set -euo pipefail",
             f"export PAUSE_HOME={shlex.quote(home)} PAUSE_PYTHON={shlex.quote(python)}"]
    if cpu is True:
        lines.append("export PAUSE_MEGATRON_CPU=1")
    elif cpu is False:
        lines.append("export PAUSE_REQUIRE_GPU=1 PAUSE_MEGATRON_CPU=0")
    lines.append(f"export PAUSE_MAX_REQUEUES={int(max_requeues)} PAUSE_STOP_DIR={shlex.quote(stop_dir)}")
    lines.append(f"source {shlex.quote(COMMON_SH)}")
    lines += ["run_step " + shlex.join(step) for step in steps]
    lines.append('cd "$PAUSE_HOME" && "$PAUSE_PYTHON" ' + shlex.join(mark))
    return "\n".join(lines) + "\n"


def sbatch_command(script: str, *, name: str, out_dir: str, nodes: int, ntasks_per_node: int, gpus_per_node: int,
                   cpus_per_task: int, time: str, signal: Optional[str], deps: list[str], extra: list[str],
                   workdir: str, comment: str, mem_gb: Optional[int] = None) -> list[str]:
    """sbatch's arguments for one stage. `gpus_per_node` is asked whenever it is above 0 (a GPU stage on one
    GPU too); `signal` (e.g. USR1@300) for stages that stop cleanly on it; `--kill-on-invalid-dep=yes` cancels
    the stage when a stage it waits for fails; `comment` (stage_comment) lets a rerun find the job even when
    its id was never recorded (sbatch timed out after Slurm took the job); `mem_gb`: the node memory the job
    needs (the import's), else the cluster's default."""
    return ["sbatch", "--parsable", f"--job-name={name}", f"--comment={comment}", f"--chdir={workdir}",
            f"--nodes={nodes}",
            f"--ntasks-per-node={ntasks_per_node}", f"--cpus-per-task={cpus_per_task}",
            *([f"--gpus-per-node={gpus_per_node}"] if gpus_per_node > 0 else []),
            *([f"--mem={mem_gb}G"] if mem_gb else []), f"--time={time}",
            f"--output={out_dir}/slurm-%j.out", "--open-mode=append", "--requeue",
            *([f"--signal={signal}"] if signal else []),
            "--kill-on-invalid-dep=yes", *([f"--dependency=afterok:{':'.join(deps)}"] if deps else []),
            *extra, script]
