"""benchmarks/bench_gpu.py runs end to end (project step and plain-PyTorch peer) in its tiny CPU mode."""

import pytest

from helpers import python

pytestmark = pytest.mark.slow


def test_bench_gpu_tiny_runs_project_and_peer():
    proc = python("benchmarks/bench_gpu.py", "--tiny", timeout=600)
    assert "failed" not in proc.stdout
    row = [line for line in proc.stdout.splitlines() if line.startswith("| tiny | bf16 |")]
    assert len(row) == 1
    ratio = float(row[0].split("|")[9])  # tokens/s project/peer
    assert ratio > 0
