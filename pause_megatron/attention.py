"""Core attention for Megatron-Core's local layer spec on torch.nn.functional.scaled_dot_product_attention.

Megatron's own DotProductAttention (the local spec's default) materialises every [b, heads, sq, sk] score
matrix in the activation dtype and keeps it for the backward pass; SDPA picks a flash or memory-efficient
kernel on a GPU (and a fused one on the CPU), so the local spec trains at plain-PyTorch speed without
Transformer Engine. The module is swapped in as the `core_attention` submodule of the spec (see
`model.layer_spec`); it takes DotProductAttention's constructor and forward arguments (megatron-core 0.16 to
0.19) and has no parameters, so checkpoints do not depend on which of the two is used.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """[sq, b, np, hn] query, [sk, b, ng, hn] key/value -> [sq, b, np * hn] context, for this TP rank's heads."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not do context parallelism (use the TE spec)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports only vanilla softmax without sliding windows")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # Megatron's query-key layer scaling divides by layer_number and multiplies it back inside the
        # softmax: the net scale is the same, so it is not applied here.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences and attention bias need the TE spec")
        sq, b, heads, hn = query.shape
        sk, groups = key.shape[0], key.shape[2]
        if heads != groups:  # grouped-query attention: repeat each key/value group for its query heads
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask, causal = self._mask(attention_mask, attn_mask_type, sq, sk, query.device)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            # Different heads on different TP ranks: draw from the model-parallel RNG, as Megatron does.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     is_causal=causal, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)

    def _mask(self, attention_mask, attn_mask_type, sq: int, sk: int, device):
        """(attn_mask for SDPA (True = attend), is_causal).

        Causal means each query sees the keys up to its own position; with a KV cache the sq queries are the
        *last* sq of sk positions, so the mask is aligned bottom-right. SDPA's is_causal aligns top-left,
        so it is used only when sq == sk. Megatron passes `no_mask` for every cached step after the prompt,
        which is right for one new token only; a causal layer stays causal here, which gives the same for
        one token and the right answer for several. A given `attention_mask` (True = masked out, Megatron's
        convention) is honoured as well.
        """
        causal_kinds = (AttnMaskType.causal, AttnMaskType.padding_causal)
        allowed = None if attention_mask is None else ~attention_mask
        if (self.attn_mask_type in causal_kinds or attn_mask_type in causal_kinds) and sq > 1:
            if allowed is None and sq == sk:
                return None, True
            causal = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
            allowed = causal if allowed is None else allowed & causal
        return allowed, False
