"""The width finetuning pads a microbatch to (in-process, no Megatron; the losses it gives: test_batched_eval.py)."""

import pytest

from pause_megatron.config import load_config
from pause_megatron.data import padded_width


@pytest.mark.parametrize("fp8, recipe, tensor, want", [
    (None, "delayed", 1, [8, 104, 2040]),
    (None, "delayed", 2, [16, 112, 2040]),  # sequence parallel splits the width over the TP ranks
    ("e4m3", "delayed", 1, [16, 112, 2040]),  # FP8 GEMMs: token dimension a multiple of 16
    ("hybrid", "tensorwise", 2, [32, 128, 2040]),
    ("e4m3", "mxfp8", 1, [32, 128, 2040]),  # MXFP8: of 32
])
def test_microbatch_width_is_aligned_for_the_precision_and_capped_at_seq_length(fp8, recipe, tensor, want):
    """Rounded up to the alignment, never past seq_length (2040 here: 2039 would round to 2048 at 16)."""
    cfg = load_config(None, ["model.seq_length=2040"])
    # set after loading: validation refuses FP8 without a GPU, and the rule does not need one
    cfg.precision.fp8, cfg.precision.fp8_recipe, cfg.parallel.tensor = fp8, recipe, tensor
    assert [padded_width(n, cfg) for n in (1, 100, 2039)] == want
