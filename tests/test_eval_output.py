"""`--output` of a data-parallel evaluation holds every rank's generations, as one process's does."""

import json

import pytest

from conftest import SAMPLE_TASKS
from helpers import torchrun

pytestmark = pytest.mark.slow


def _evaluate(checkpoint, output, nproc):
    torchrun("-m pause_megatron.evaluate", "--checkpoint", str(checkpoint), "--tasks", "nq_open,squad",
             "--data-dir", SAMPLE_TASKS, "--limit", "4", "--output", str(output), "tracking.enabled=false",
             nproc=nproc)
    with open(output) as f:
        return json.load(f)["samples"]


def test_data_parallel_output_keeps_every_ranks_generations(pretrained, tmp_path):
    single = _evaluate(pretrained, tmp_path / "single.json", 1)
    split = _evaluate(pretrained, tmp_path / "dp2.json", 2)
    docs = [(t, i) for t in ("pause_nq_open", "pause_squad") for i in range(4)]  # lm-eval's task names
    assert sorted((s["task"], s["doc_id"]) for s in split) == docs
    key = lambda s: (s["task"], s["doc_id"])  # noqa: E731
    assert sorted(split, key=key) == sorted(single, key=key)
