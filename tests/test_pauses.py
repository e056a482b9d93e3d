"""The pause rule (pause_megatron.pauses) as properties: injection, the loss mask and placement."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from pause_megatron.pauses import (
    PAPER_M_FT,
    PAPER_SEQ_LENGTH,
    PRETRAIN_PAUSE_RATIO,
    inject_pauses,
    num_pretrain_pauses,
    pause_loss_mask,
    place_pauses,
)

PAUSE = 1000  # an id never drawn for real tokens below


def real_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, PAUSE, size=n).astype(np.int64)


def test_paper_window_gets_205_pauses():
    assert num_pretrain_pauses(seq_length=PAPER_SEQ_LENGTH, ratio=PRETRAIN_PAUSE_RATIO) == 205


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), seq_extra=st.integers(0, 200), ratio=st.floats(0.0, 0.5), seed=st.integers(0, 2**32))
def test_injection_keeps_order_and_cuts_to_seq_length(length, seq_extra, ratio, seed):
    seq_length = max(length + seq_extra, 1)
    tokens = real_tokens(length, seed)
    out = inject_pauses(tokens, pause_id=PAUSE, seq_length=seq_length, rng=np.random.default_rng(seed), ratio=ratio)
    m = num_pretrain_pauses(seq_length=seq_length, ratio=ratio)
    assert len(out) == min(length + m, seq_length)
    assert out.dtype == tokens.dtype
    real = out[out != PAUSE]
    # The real tokens are a prefix of the input, in order; the truncated tail is what was pushed out.
    np.testing.assert_array_equal(real, tokens[: len(real)])
    if length + m <= seq_length:  # nothing cut: every pause and every token is there
        assert (out == PAUSE).sum() == m
        assert len(real) == length
    else:
        assert (out == PAUSE).sum() <= m


def test_full_window_has_seq_length_tokens_and_at_most_m_pauses():
    out = inject_pauses(real_tokens(PAPER_SEQ_LENGTH), pause_id=PAUSE, seq_length=PAPER_SEQ_LENGTH,
                        rng=np.random.default_rng(1))
    assert len(out) == PAPER_SEQ_LENGTH
    assert 0 < (out == PAUSE).sum() <= 205


def test_injection_is_deterministic_for_a_seed():
    tokens = real_tokens(500)
    a = inject_pauses(tokens, pause_id=PAUSE, seq_length=512, rng=np.random.default_rng(7))
    b = inject_pauses(tokens, pause_id=PAUSE, seq_length=512, rng=np.random.default_rng(7))
    c = inject_pauses(tokens, pause_id=PAUSE, seq_length=512, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pause_positions_are_uniform_over_gaps():
    """Chi-square over the gap each pause lands in (20 tokens -> 21 gaps), 3000 draws, no truncation."""
    length, seq_length = 20, 400  # M = 40, never truncated
    counts = np.zeros(length + 1)
    rng = np.random.default_rng(123)
    tokens = real_tokens(length)
    for _ in range(3000):
        out = inject_pauses(tokens, pause_id=PAUSE, seq_length=seq_length, rng=rng)
        real_before = np.cumsum(out != PAUSE)  # number of real tokens at or before each position
        counts += np.bincount(real_before[out == PAUSE], minlength=length + 1)
    assert counts.sum() == 3000 * 40
    assert chisquare(counts).pvalue > 1e-3


def test_repeated_gaps_stack_pauses():
    """With far more pauses than gaps, some gap must hold several pauses side by side."""
    out = inject_pauses(real_tokens(3), pause_id=PAUSE, seq_length=100, rng=np.random.default_rng(0), ratio=0.2)
    assert (out == PAUSE).sum() == 20 and len(out) == 23


def test_injection_rejects_bad_input():
    with pytest.raises(ValueError, match="longer than seq_length"):
        inject_pauses(real_tokens(10), pause_id=PAUSE, seq_length=5, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        inject_pauses(np.zeros((2, 2), dtype=np.int64), pause_id=PAUSE, seq_length=8, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="ratio"):
        num_pretrain_pauses(seq_length=10, ratio=1.5)


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(st.sampled_from([0, 5, 7, PAUSE, 3]), min_size=1, max_size=64))
def test_loss_mask_is_zero_exactly_where_the_target_is_a_pause(labels):
    arr = np.array(labels)
    mask = pause_loss_mask(arr, pause_id=PAUSE)
    np.testing.assert_array_equal(mask == 0, arr == PAUSE)
    assert mask.dtype == np.float32
    tmask = pause_loss_mask(torch.tensor(labels), pause_id=PAUSE)
    assert tmask.dtype == torch.float32
    np.testing.assert_array_equal(tmask.numpy(), mask)


def test_loss_mask_also_drops_padding():
    labels = np.array([5, PAUSE, 3, 3, 9])
    np.testing.assert_array_equal(pause_loss_mask(labels, pause_id=PAUSE, pad_id=3), [1, 0, 0, 0, 1])


def test_loss_mask_keeps_outputs_at_pause_positions_that_predict_real_tokens():
    """Inputs [a, <p>, b] -> labels [<p>, b, EOD]: the output at the pause (predicting b) is trained."""
    tokens = np.array([11, 12, PAUSE, 13, 2])
    labels = tokens[1:]
    np.testing.assert_array_equal(pause_loss_mask(labels, pause_id=PAUSE), [1, 0, 1, 1])


@pytest.mark.parametrize("m", PAPER_M_FT)
def test_placements(m):
    prompt = [5, 6, 7]
    assert place_pauses(prompt, m=m, pause_id=PAUSE) == prompt + [PAUSE] * m
    assert place_pauses(prompt, m=m, pause_id=PAUSE, placement="prepend") == [PAUSE] * m + prompt
    assert place_pauses(prompt, m=m, pause_id=PAUSE, placement="none") == prompt
    assert place_pauses(prompt, m=m, pause_id=PAUSE, placement="filler", filler_id=9) == prompt + [9] * m


def test_placement_errors():
    with pytest.raises(ValueError, match="filler_id"):
        place_pauses([1], m=2, pause_id=PAUSE, placement="filler")
    with pytest.raises(ValueError, match="unknown pause placement"):
        place_pauses([1], m=2, pause_id=PAUSE, placement="middle")
    with pytest.raises(ValueError, match=">= 0"):
        place_pauses([1], m=-1, pause_id=PAUSE)
    assert place_pauses(np.array([1, 2]), m=0, pause_id=PAUSE) == [1, 2]
