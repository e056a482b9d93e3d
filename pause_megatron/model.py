"""Megatron-Core GPTModel from a preset: local layer spec on the CPU, Transformer Engine spec on a GPU.

The `<pause>` embedding is an ordinary row of the (padded) embedding table: nothing here knows about pauses.
"""

from __future__ import annotations

from typing import Optional

import torch

from pause_megatron.compat import gpt_model, no_cuda_graph_modules
from pause_megatron.config import Config, resolved_dtype


def transformer_config(cfg: Config, *, cuda: bool):
    """Map our config onto Megatron's TransformerConfig (the one dataclass every Megatron module reads)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = cfg.model, cfg.parallel
    dtype = resolved_dtype(cfg, cuda=cuda)
    bf16 = dtype == "bf16"
    params_dtype = torch.bfloat16 if bf16 else torch.float32
    fused = cuda  # kernel fusions need CUDA (and apex/TE); on the CPU every fusion is off
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=bf16,
        autocast_dtype=params_dtype,
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=fused,
        apply_rope_fusion=False,
        calculate_per_token_loss=True,  # pause targets are masked: normalise by the real token count
        # Batched isend/irecv pairs a rank's messages to the same peer by order; on gloo with PP=2 and
        # virtual stages the forward activation and the backward gradient (same shape) then cross.
        # Unbatched P2P keeps the two directions on separate communicators.
        batch_p2p_comm=cuda,
        **no_cuda_graph_modules(),
    )
    if cfg.precision.fp8 is not None:
        kwargs.update(fp8=cfg.precision.fp8, fp8_recipe=cfg.precision.fp8_recipe)
    return TransformerConfig(**kwargs)


def layer_spec(cfg: Config, *, cuda: bool):
    """The Transformer Engine spec when TE and a GPU are there (required for FP8), else the local spec."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from pause_megatron.config import transformer_engine_available

    if cuda and transformer_engine_available():
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=cfg.model.normalization)


def build_gpt(
    cfg: Config,
    *,
    vocab_size: int,
    cuda: bool,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
):
    """One GPTModel (one pipeline chunk). `vocab_size` must already be padded for TP."""
    tconfig = transformer_config(cfg, cuda=cuda)
    kwargs = dict(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg, cuda=cuda),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    return gpt_model(**kwargs)


def build_model_chunks(cfg: Config, *, vocab_size: int, cuda: bool) -> list:
    """The model chunks this rank holds: one, or `virtual_pipeline` of them for interleaved 1F1B."""
    from megatron.core import parallel_state

    vpp = cfg.parallel.virtual_pipeline
    if vpp is None:
        return [
            build_gpt(
                cfg,
                vocab_size=vocab_size,
                cuda=cuda,
                pre_process=parallel_state.is_pipeline_first_stage(),
                post_process=parallel_state.is_pipeline_last_stage(),
            )
        ]
    chunks = []
    for stage in range(vpp):
        chunks.append(
            build_gpt(
                cfg,
                vocab_size=vocab_size,
                cuda=cuda,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
        )
    return chunks


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preset_parameter_count(cfg: Config, *, vocab_size: int) -> int:
    """Parameters of the full model (TP=PP=1), built on the meta device (no memory) in a lone process."""
    import dataclasses

    from pause_megatron import runtime

    single = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1,
                                                                    virtual_pipeline=None, sequence_parallel=False))
    runtime.init_distributed(single)
    with torch.device("meta"):
        model = build_gpt(single, vocab_size=vocab_size, cuda=False)
    return count_parameters(model)


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m pause_megatron.model [preset ...]`: print each preset's parameter count as JSON lines."""
    import argparse
    import json

    from pause_megatron.config import PRESETS, load_config
    from pause_megatron.tokenizer import DEFAULT_VOCAB_SIZE, padded_vocab_size

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("presets", nargs="*", default=sorted(PRESETS))
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE + 1, help="with <pause>, before padding")
    args = ap.parse_args(argv)
    for preset in args.presets:
        cfg = load_config(None, [f"model.preset={preset}"])
        vocab = padded_vocab_size(args.vocab_size)
        print(json.dumps({"preset": preset, "parameters": preset_parameter_count(cfg, vocab_size=vocab),
                          "padded_vocab_size": vocab}))


if __name__ == "__main__":
    main()
