"""Megatron-Core GPTModel from a preset: Transformer Engine spec where TE and a GPU are, else the local spec.

Which spec and which fused kernels are used is decided in pause_megatron.kernels; bf16 chunks are wrapped in
Megatron's Float16Module as Megatron's own training does (`prepare_chunks`).

The `<pause>` embedding is an ordinary row of the (padded) embedding table: nothing here knows about pauses.
"""

from __future__ import annotations

from typing import Optional

import torch

from pause_megatron.compat import gpt_model, no_cuda_graph_modules
from pause_megatron import kernels as kernels_
from pause_megatron.config import Config, resolved_dtype


def kernel_choice(cfg: Config, *, cuda: bool) -> kernels_.Kernels:
    """This machine's kernel decisions for `cfg` (see pause_megatron.kernels)."""
    return kernels_.choose(kernels_.Present.detect(cuda=cuda), spec=cfg.model.spec,
                           normalization=cfg.model.normalization)


def kernel_summary(cfg: Config, *, cuda: bool) -> str:
    """The one log line of this job's kernel decisions (kernels.summary)."""
    present = kernels_.Present.detect(cuda=cuda)
    return kernels_.summary(kernels_.choose(present, spec=cfg.model.spec, normalization=cfg.model.normalization),
                            present)


def transformer_config(cfg: Config, *, cuda: bool, kernels: Optional[kernels_.Kernels] = None):
    """Map our config onto Megatron's TransformerConfig (the one dataclass every Megatron module reads)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p = cfg.model, cfg.parallel
    k = kernels or kernel_choice(cfg, cuda=cuda)
    dtype = resolved_dtype(cfg, cuda=cuda)
    bf16 = dtype == "bf16"
    params_dtype = torch.bfloat16 if bf16 else torch.float32
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
        **k.transformer_config_kwargs(),
        calculate_per_token_loss=True,  # pause targets are masked: normalise by the real token count
        # Batched isend/irecv pairs a rank's messages to the same peer by order; on gloo with PP=2 and
        # virtual stages the forward activation and the backward gradient (same shape) then cross.
        # Unbatched P2P keeps the two directions on separate communicators.
        batch_p2p_comm=cuda,
        **no_cuda_graph_modules(),
    )
    kwargs.update(architecture_kwargs(m))
    kwargs.update(activation_kwargs(m, fused=k.bias_activation_fusion))
    if cfg.precision.fp8 is not None:
        kwargs.update(fp8=cfg.precision.fp8, fp8_recipe=cfg.precision.fp8_recipe)
    return TransformerConfig(**kwargs)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation: what Megatron's fused bias-GELU (bias_gelu_impl) computes."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu_kwargs(gelu: str, *, fused: bool) -> dict:
    """TransformerConfig's activation for `model.gelu`, the same function on every device.

    Megatron fuses bias + GELU only when activation_func is F.gelu, and its fused kernel is the tanh
    approximation; unfused it calls activation_func itself. So "tanh" is F.gelu where the fusion is on (a GPU)
    and `gelu_tanh` where it is off (the CPU); "exact" is F.gelu with the fusion off everywhere."""
    if gelu == "exact":
        return {"activation_func": torch.nn.functional.gelu, "bias_activation_fusion": False}
    return {"activation_func": torch.nn.functional.gelu if fused else gelu_tanh, "bias_activation_fusion": fused}


def architecture_kwargs(m) -> dict:
    """TransformerConfig's keywords for the Llama-family settings (at their defaults: the paper's GPT)."""
    return dict(num_query_groups=m.num_query_groups, add_bias_linear=m.linear_bias == "all",
                add_qkv_bias=m.linear_bias == "qkv", layernorm_epsilon=m.norm_epsilon)


def activation_kwargs(m, *, fused: bool) -> dict:
    """The MLP's activation: model.gelu's GELU, or SwiGLU (gated: silu(first half of fc1) * second half). Megatron
    fuses SwiGLU (bias_swiglu_impl, with or without bias) where bias-activation fusion is on; unfused it computes
    the same function in torch."""
    if m.mlp == "swiglu":
        return {"activation_func": torch.nn.functional.silu, "gated_linear_unit": True,
                "bias_activation_fusion": fused}
    # Megatron's fused bias-GELU needs the bias (TransformerConfig refuses it without add_bias_linear): with no
    # MLP bias, gelu_kwargs' unfused branch computes the same function
    return gelu_kwargs(m.gelu, fused=fused and m.linear_bias == "all")


def layer_spec(cfg: Config, kernels: kernels_.Kernels):
    """The Transformer Engine spec, or the local spec with SDPA as its core attention (a spec submodule)."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if kernels.spec == "te":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=cfg.model.normalization)
    if not kernels.sdpa_attention:
        return spec
    from pause_megatron.attention import SDPAttention

    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules,
                                                                              core_attention=SDPAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def prepare_chunks(chunks: list, *, cuda: bool) -> list:
    """Chunks on the GPU and, in bf16, wrapped in Float16Module, as Megatron's training.get_model does
    before DDP: weights (norms included) in bf16, inputs cast on the first stage, outputs back to fp32 on
    the last. The optimizer keeps fp32 main parameters (OptimizerConfig.bf16)."""
    from megatron.core.transformer.module import Float16Module

    if cuda:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if chunks[0].config.bf16:
        chunks = [Float16Module(c.config, c) for c in chunks]
    return chunks


def unwrap(module):
    """The bare GPTModel inside DDP / Float16Module wrappers (their `module` attribute)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def build_gpt(
    cfg: Config,
    *,
    vocab_size: int,
    cuda: bool,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    kernels: Optional[kernels_.Kernels] = None,
):
    """One GPTModel (one pipeline chunk). `vocab_size` must already be padded for TP.

    `kernels` overrides this machine's decisions (tests simulate a GPU's on the CPU)."""
    kernels = kernels or kernel_choice(cfg, cuda=cuda)
    tconfig = transformer_config(cfg, cuda=cuda, kernels=kernels)
    kwargs = dict(
        config=tconfig,
        transformer_layer_spec=layer_spec(cfg, kernels),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
    )
    if cfg.model.rope_scaling_factor is not None:  # Llama 3.x: GPTModel's keywords in 0.16.1 and 0.19 alike
        kwargs.update(rope_scaling=True, rope_scaling_factor=cfg.model.rope_scaling_factor)
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    return gpt_model(**kwargs)


def build_model_chunks(cfg: Config, *, vocab_size: int, cuda: bool,
                       kernels: Optional[kernels_.Kernels] = None) -> list:
    """The model chunks this rank holds: one, or `virtual_pipeline` of them for interleaved 1F1B."""
    from megatron.core import parallel_state

    vpp = cfg.parallel.virtual_pipeline
    if vpp is None:
        return [
            build_gpt(
                cfg,
                vocab_size=vocab_size,
                cuda=cuda,
                kernels=kernels,
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
                kernels=kernels,
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
