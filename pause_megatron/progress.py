"""Progress bars that stay readable in a batch log (Slurm's slurm-%j.out, a recipe's stage.log).

On a terminal: tqdm as usual. Elsewhere a bar redrawn with carriage returns piles every redraw onto one line
of the file, so each redraw becomes a line of its own, at most one every BATCH_INTERVAL_S seconds; and the
libraries' own bars (lm-eval's, `datasets`'), which say little in a log, are switched off (`quiet_library_bars`).
"""

from __future__ import annotations

import os
import sys

BATCH_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that writes each redraw as one plain line (no carriage return, no padding)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def quiet_library_bars() -> None:
    """When stderr is not a terminal, turn off the progress bars of the libraries a job uses.

    tqdm reads TQDM_* variables as defaults when it is first imported (pause_megatron/__init__.py calls this
    before anything imports it), so lm-eval's bars, which take no option from here, and `datasets`' are off;
    `bar` passes `disable` itself and stays on. A variable the user set is left as it is.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr: redrawn in place on a terminal, one line per BATCH_INTERVAL_S otherwise."""
    from tqdm import tqdm

    kwargs.setdefault("disable", False)  # not TQDM_DISABLE's default (quiet_library_bars)

    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=BATCH_INTERVAL_S, ncols=100, ascii=True, **kwargs)
