"""The pause rule of Goyal et al. (ICLR 2024), in one place.

Everything that puts `<pause>` tokens into a sequence or decides where the loss counts calls this module:
data prep (pause-pretraining), the pretraining dataset (loss mask), finetuning and evaluation (placing
M pauses around a prompt).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PRETRAIN_PAUSE_RATIO = 0.10  # M_pt = 10% of N in the paper (Section 3.1)
PAPER_SEQ_LENGTH = 2048  # N in the paper
PAPER_M_FT = (10, 50)  # the two finetuning pause counts the paper reports (best of the two per task)

Placement = Literal["append", "prepend", "none", "filler"]
PLACEMENTS: tuple[str, ...] = ("append", "prepend", "none", "filler")


def num_pretrain_pauses(*, seq_length: int, ratio: float = PRETRAIN_PAUSE_RATIO) -> int:
    """M_pt = round(ratio * seq_length): how many pauses go into one pretraining window."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pause ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * seq_length))


def inject_pauses(
    tokens: np.ndarray,
    *,
    pause_id: int,
    seq_length: int,
    rng: np.random.Generator,
    ratio: float = PRETRAIN_PAUSE_RATIO,
) -> np.ndarray:
    """Insert round(ratio * seq_length) pauses at uniformly random gaps, then cut to seq_length tokens.

    `tokens` is a 1-D integer array (at most `seq_length` long). Each pause picks one of the
    len(tokens) + 1 gaps independently and uniformly (repeats allowed: several pauses may share a gap).
    The real tokens keep their order; the tail pushed past `seq_length` is dropped, as in the paper.
    Returns a new array of min(len(tokens) + M, seq_length) tokens with the input's dtype.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"inject_pauses takes a 1-D token array, got shape {tokens.shape}")
    if len(tokens) > seq_length:
        raise ValueError(f"sequence of {len(tokens)} tokens is longer than seq_length={seq_length}")
    m = num_pretrain_pauses(seq_length=seq_length, ratio=ratio)
    gaps = np.sort(rng.integers(0, len(tokens) + 1, size=m))
    # np.insert places every pause before tokens[gap]; equal gaps stack pauses side by side.
    out = np.insert(tokens, gaps, np.asarray(pause_id, dtype=tokens.dtype))
    return out[:seq_length]


def window_rng(*, seed: int, shard_index: int, window_index: int) -> np.random.Generator:
    """The generator that places the pauses of one pretraining window: a function of the window alone.

    Data prep (offline pause shards) and the online source (pauses injected as the std shards are read)
    both seed `inject_pauses` with it, so the two yield the same windows.
    """
    return np.random.default_rng([seed, shard_index, window_index])


def paused_lengths(lengths: np.ndarray, *, seq_length: int, ratio: float = PRETRAIN_PAUSE_RATIO) -> np.ndarray:
    """The lengths `inject_pauses` gives windows of `lengths` tokens: min(length + M, seq_length).

    The pause count depends on the length only, not on where the pauses go, so the lengths are known without
    reading or injecting any token.
    """
    m = num_pretrain_pauses(seq_length=seq_length, ratio=ratio)
    return np.minimum(np.asarray(lengths) + m, seq_length).astype(np.asarray(lengths).dtype)


def pause_loss_mask(labels, *, pause_id: int, pad_id: int | None = None):
    """1.0 where the label is a real token, 0.0 where the target is `<pause>` (S_ignore) or padding.

    Works on numpy arrays and torch tensors alike and returns a float mask of the same kind and shape.
    Outputs *at* a pause position whose target is a real token keep their loss: only targets matter.
    """
    keep = labels != pause_id
    if pad_id is not None:
        keep = keep & (labels != pad_id)
    if isinstance(keep, np.ndarray):
        return keep.astype(np.float32)
    return keep.float()


def place_pauses(
    prompt: list[int] | np.ndarray,
    *,
    m: int,
    pause_id: int,
    placement: Placement = "append",
    filler_id: int | None = None,
) -> list[int]:
    """The prompt with M pauses placed for finetuning or inference (PauseFT / pause-inference).

    append: prompt + M pauses (the paper's method); prepend: M pauses + prompt (the ablation);
    none: the prompt alone (StdFT); filler: prompt + M copies of `filler_id` (the `.` baseline).
    """
    prompt = [int(t) for t in prompt]
    if m < 0:
        raise ValueError(f"number of pauses must be >= 0, got {m}")
    if placement == "append":
        return prompt + [pause_id] * m
    if placement == "prepend":
        return [pause_id] * m + prompt
    if placement == "none":
        return prompt
    if placement == "filler":
        if filler_id is None:
            raise ValueError("placement 'filler' needs a filler_id")
        return prompt + [filler_id] * m
    raise ValueError(f"unknown pause placement {placement!r}; expected one of {PLACEMENTS}")


def fit_placed(
    prompt: list[int] | np.ndarray,
    *,
    m: int,
    pause_id: int,
    placement: Placement = "append",
    filler_id: int | None = None,
    max_length: int,
) -> list[int]:
    """`place_pauses` in at most `max_length` tokens: the prompt is cut from the left, the pauses kept whole.

    The one truncation rule of finetuning and evaluation (for every placement: with prepend the pauses stay in
    front of the kept end of the prompt). At least one prompt token is kept when the prompt has any; a
    `max_length` too small for that and the pauses is an error.
    """
    added = len(place_pauses([], m=m, pause_id=pause_id, placement=placement, filler_id=filler_id))
    prompt = [int(t) for t in prompt]
    keep = max_length - added
    if keep < min(1, len(prompt)):
        raise ValueError(f"{m} pauses and a prompt token do not fit in {max_length} tokens")
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    return place_pauses(prompt, m=m, pause_id=pause_id, placement=placement, filler_id=filler_id)


def finetune_example(
    prompt: list[int],
    target: list[int],
    *,
    m: int,
    pause_id: int,
    placement: Placement = "append",
    filler_id: int | None = None,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """PauseFT: (ids, is_target) for prompt + M placed pauses + target; the loss is on target ids only.

    `is_target[i]` is 1 where ids[i] is a target token (so the output at i - 1 is trained on it), 0 on the
    prompt and the pauses. With `max_length`, the prompt is cut from the left (`fit_placed`: the pauses and the
    target are kept whole); a target that leaves no room for the pauses and one prompt token is an error.
    """
    if max_length is None:
        placed = place_pauses(prompt, m=m, pause_id=pause_id, placement=placement, filler_id=filler_id)
    else:
        try:
            placed = fit_placed(prompt, m=m, pause_id=pause_id, placement=placement, filler_id=filler_id,
                                max_length=max_length - len(target))
        except ValueError:
            raise ValueError(f"target of {len(target)} tokens and {m} pauses do not fit in {max_length} "
                             "tokens") from None
    ids = placed + [int(t) for t in target]
    return ids, [0] * len(placed) + [1] * len(target)
