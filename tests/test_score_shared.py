"""`decoding.score_shared` (a context's shared positions computed once) scores every row as `score_batch` does
one row at a time. Fast: a tiny random model in one subprocess (tests/dist/score_shared_rows.py), both
position embeddings, the row shapes listed there. Planted defects and what they did: docs/testing.md.
"""

import json

import pytest

from helpers import ROOT, python

# The same float32 arithmetic in matmuls of other shapes: measured <= 3e-7 relative; the defects this test is
# for (logits read at the wrong positions, rows at the wrong positions) move log-likelihoods by >= 1e-2.
LL_REL = 1e-5


@pytest.fixture(scope="module")
def shared():
    proc = python(str(ROOT / "tests" / "dist" / "score_shared_rows.py"))
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("SHARED ")][-1][7:])


@pytest.mark.parametrize("embedding", ["rope", "learned_absolute"])
def test_score_shared_equals_score_batch_one_row_at_a_time(shared, embedding):
    """Every case, on the installed megatron-core (0.19 reads the all-positions switch from the context's
    InferenceConfig, `compat.logits_at_every_position`)."""
    results = shared[embedding]
    assert len(results) == 5
    for name, got in results.items():
        assert "error" not in got, (name, got)
        assert got["max_rel"] < LL_REL, (name, got)
        assert got["flags_equal"], name
    # the all-positions switch is set for the rows' forward only: the prefill computes its last position's logits
    assert shared[f"{embedding} prefill positions"] == 1
