"""`decoding.score_rows` (one max and one exp-sum pass per position, in place, no argmax) against the plain
reference: `log_softmax` over the whole output layer and `greedy_pick` on the logits (as `generate` picks).

Pure torch, no model: the logits are built so that every branch is taken: continuations that greedy picks,
ties at the maximum (before and after the target, as bf16 logits have them), a maximum on `<pause>` or on a
padded id (greedy then picks the next), a target that may not be emitted, blocks that split a continuation.
"""

import math

import pytest
import torch

from pause_megatron import decoding
from pause_megatron.decoding import greedy_pick, score_block_rows, score_rows

V, VOCAB, PAUSE = 50, 45, 44  # table width, ids below VOCAB may be decoded, <pause> is banned


def reference(logits, continuations, **pick):
    out, k = [], 0
    for x in continuations:
        logprobs = torch.log_softmax(logits[k: k + len(x)], -1)
        target = torch.tensor(x, dtype=torch.long)
        out.append((float(logprobs.gather(1, target[:, None]).sum()),
                    bool((greedy_pick(logits[k: k + len(x)], **pick) == target).all())))  # as `generate` picks
        k += len(x)
    return out


def check(logits, continuations, **pick):
    want = reference(logits.clone(), continuations, **pick)
    got = score_rows(logits.clone(), continuations, **pick)
    assert [g for _, g in got] == [g for _, g in want]
    for (a, _), (b, _) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-5)
    return got


PICK = {"vocab_size": VOCAB, "banned_ids": (PAUSE,)}


def test_planted_cases():
    g = torch.Generator().manual_seed(0)
    rows = []  # (logits [V], target, greedy expected)

    def row(target, expect, **plant):
        x = torch.randn(V, generator=g)
        for i, v in plant.items():
            x[int(i[1:])] = v
        rows.append((x, target, expect))

    row(7, True, i7=9.0)  # the unique maximum
    row(7, False, i3=9.0, i7=9.0)  # tied with an earlier id: greedy picks id 3
    row(7, True, i7=9.0, i20=9.0)  # tied with a later id: id 7 is the first
    row(7, True, i44=12.0, i7=9.0)  # <pause> is larger but banned
    row(7, True, i47=12.0, i7=9.0)  # a padded id is larger but never decoded
    row(7, False, i44=12.0, i7=9.0, i2=9.0)  # banned maximum, then a tie below it
    row(44, False, i44=12.0)  # the target is <pause>: never greedy
    row(46, False, i46=12.0)  # the target is a padded id
    row(7, False, i8=9.0, i7=8.0)  # not the maximum
    row(7, True, i44=120.0, i7=9.0)  # the normaliser counts <pause>: log p = 9 - 120 - log(...), finite
    row(3, True, i47=12.0, i3=9.0, i7=9.0)  # a padded id on top, then a tie: the first (the target) wins
    row(46, False, i46=9.0, i7=9.0)  # a padded target as large as the largest allowed logit
    logits = torch.stack([x for x, _, _ in rows])
    continuations = [[t] for _, t, _ in rows]
    got = check(logits, continuations, **PICK)
    assert [g for _, g in got] == [e for _, _, e in rows]
    assert all(math.isfinite(ll) for ll, _ in got)
    # without banned ids or padding, the <pause>-and-padded rows pick their largest logit
    got = check(logits, continuations)
    assert [g for _, g in got] == [True, False, True, False, False, False, True, True, False, False, False, False]


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # 1000: the whole tensor at once, as on a GPU
def test_random_bf16_logits_greedy_continuations_and_blocks(monkeypatch, chunk_rows):
    """Random logits rounded to bf16 (ties occur), half the targets greedy's own pick, blocks that split
    continuations: scores within float32 rounding of the reference, greedy flags identical."""
    monkeypatch.setitem(decoding.SCORE_CHUNK_ELEMENTS, "cpu", chunk_rows * V)
    g = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(1, 6, (40,), generator=g)]
    logits = (torch.randn(sum(lengths), V, generator=g) * 2).bfloat16().float()
    logits[:, 30:40] = logits[:, 30:40].round()  # coarse values: ties at the maximum are common
    picks = greedy_pick(logits, **PICK)
    noise = torch.randint(0, V, picks.shape, generator=g)
    targets = torch.where(torch.rand(picks.shape, generator=g) < 0.8, picks, noise).tolist()
    continuations, k = [], 0
    for n in lengths:
        continuations.append(targets[k: k + n])
        k += n
    got = check(logits, continuations, **PICK)
    assert 5 < sum(g for _, g in got) < len(got)  # both outcomes occur
    ties = (logits[:, :VOCAB] == logits[:, :VOCAB].amax(-1, keepdim=True)).sum(-1) > 1
    assert bool(ties.any())
    check(logits, continuations)  # and with nothing banned


def test_float32_logits_greedy_targets():
    """Unrounded float32 logits, every target greedy's pick: the tie check's masking of the target is undone
    to the bit (a bf16 value would survive a lossy restore)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(30, V, generator=g) * 3
    targets = greedy_pick(logits, **PICK).tolist()
    got = check(logits, [targets[k: k + 3] for k in range(0, 30, 3)], **PICK)
    assert all(flag for _, flag in got)


def test_banned_ids_outside_the_table_refused():
    for banned in ((-1,), (V,)):
        with pytest.raises(ValueError, match="not ids of the 50-row output layer"):
            score_rows(torch.zeros(1, V), [[1]], banned_ids=banned)
        with pytest.raises(ValueError, match="not ids of the 50-row output layer"):
            greedy_pick(torch.zeros(1, V), banned_ids=banned)


def test_empty_rows():
    assert score_rows(torch.zeros(0, V), []) == []
    assert check(torch.randn(2, V), [[], [3, 4], []], **PICK)[0] == (0.0, True)


def test_blocks_per_device_kind():
    """A CPU works on 4 MiB of float32 at a time, an accelerator on up to 256 MiB (no device needed to ask)."""
    assert score_block_rows(32128, torch.device("cpu")) == (1 << 20) // 32128
    assert score_block_rows(32128, torch.device("cuda", 0)) == (1 << 26) // 32128
    assert score_block_rows(1 << 27, torch.device("cuda")) == 1  # a row wider than a block is a block


def test_wrong_length_refused():
    with pytest.raises(ValueError, match="3 positions of logits for 2 continuation tokens"):
        score_rows(torch.zeros(3, V), [[1, 2]])
