"""Progress bars that stay readable in a batch log (Slurm's slurm-%j.out, a recipe's stage.log).

On a terminal: tqdm as usual. Elsewhere a bar redrawn with carriage returns piles every redraw onto one line
of the file, so each redraw becomes a line of its own, at most one every BATCH_INTERVAL_S seconds.
"""

from __future__ import annotations

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


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr: redrawn in place on a terminal, one line per BATCH_INTERVAL_S otherwise."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    return tqdm(iterable, file=_Lines(sys.stderr), mininterval=BATCH_INTERVAL_S, ncols=100, ascii=True, **kwargs)
