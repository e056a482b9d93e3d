"""From token samples to the microbatches a training step takes, with the pause loss mask.

A sample is `seq_length + 1` token ids (Megatron's convention: inputs are sample[:-1], targets sample[1:]).
"""

from __future__ import annotations

import numpy as np
import torch

from pause_megatron.pauses import pause_loss_mask


def microbatches(
    samples,
    *,
    pause_id: int,
    pad_id: int | None,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[dict]:
    """Split one global batch [G, seq+1] into this data-parallel rank's microbatches.

    Global batch = dp_size x num_micro x micro_batch_size samples; in each group of dp_size microbatches,
    rank r takes the r-th (Megatron's pretraining sampler does the same).
    """
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.long)
    global_size, width = samples.shape
    step = micro_batch_size * dp_size
    if global_size % step:
        raise ValueError(f"global batch {global_size} is not divisible by micro_batch_size x dp = {step}")
    out = []
    for start in range(0, global_size, step):
        lo = start + dp_rank * micro_batch_size
        chunk = samples[lo : lo + micro_batch_size]
        tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        out.append(
            {
                "tokens": tokens,
                "labels": labels,
                "loss_mask": pause_loss_mask(labels, pause_id=pause_id, pad_id=pad_id),
                "position_ids": torch.arange(width - 1).unsqueeze(0).expand_as(tokens).contiguous(),
            }
        )
    return out
