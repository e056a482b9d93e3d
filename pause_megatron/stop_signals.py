"""Stop signals (SIGTERM, SIGUSR1: Slurm's time-limit warning, a preemption), caught from a job's first lines.

The training entry points call `catch()` before their slow imports (torch, Megatron): a signal that comes
during start-up is remembered instead of killing the process with nothing saved, and the training loop
(train.GracefulStop) then saves after its first step and stops. No heavy import here, on purpose.
"""

from __future__ import annotations

import signal

NAMES = ("SIGTERM", "SIGUSR1")
received: list[str] = []  # the signals caught before the training loop took over


def _record(signum, frame) -> None:
    received.append(signal.Signals(signum).name)


def catch() -> None:
    for name in NAMES:
        signal.signal(getattr(signal, name), _record)
