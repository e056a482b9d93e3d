"""Stop signals (SIGTERM, SIGUSR1: Slurm's time-limit warning, a preemption), caught from a job's first lines.

A process stopped this way writes what it saved to $PAUSE_STOP_FILE (slurm/common.sh run_step sets it) before
exit 75: the step of its checkpoint, or nothing (an evaluation). run_step requeues the job when the file is there,
whatever srun's exit code, and gives up after repeated stops that saved nothing newer.

The training entry points call `catch()` before their slow imports (torch, Megatron): a signal that comes
during start-up is remembered instead of killing the process with nothing saved, and the training loop
(train.GracefulStop) then saves after its first step and stops. No heavy import here, on purpose.
"""

from __future__ import annotations

import os
import signal

NAMES = ("SIGTERM", "SIGUSR1")
received: list[str] = []  # the signals caught before the training loop took over


def _record(signum, frame) -> None:
    received.append(signal.Signals(signum).name)


def catch() -> None:
    for name in NAMES:
        signal.signal(getattr(signal, name), _record)


def write_stop_file(saved: str = "") -> None:
    """Tell run_step that this rank stopped on a signal and what it saved (any rank may: they write the same)."""
    path = os.environ.get("PAUSE_STOP_FILE")
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(saved)
    os.replace(tmp, path)
