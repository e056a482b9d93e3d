"""Build and step the tiny model with the kernel decisions of other machines, under the CPU emulation.

Each case is a `Present` (what a GPU machine has), a normalization and other model settings; the model is built with exactly what
pause_megatron.kernels chooses for it and takes one bf16 training step. A case whose decisions name the
Transformer Engine spec is built with the local spec here (no TE on the CPU): the decisions that do not
need TE are kept, and the layer they can break, the output layer, is Megatron's own ColumnParallelLinear in
both specs. Writes JSON {case: {"kernels": ..., "loss": ... or "error": ...}}.
"""

import argparse
import dataclasses
import json

from pause_megatron import kernels, runtime
from pause_megatron.config import load_config
from pause_megatron.data import collate, windows_to_samples
from pause_megatron.tokenizer import padded_vocab_size
from pause_megatron.train import build_train_state, train_step

from train_layout import PAUSE_ID, VOCAB, synthetic_batch

BARE_GPU = kernels.Present(cuda=True, apex=False, transformer_engine=False, grad_accum_kernel=False)
CASES = {
    "te-without-apex": (kernels.Present(cuda=True, apex=False, transformer_engine=True, grad_accum_kernel=False),
                        "LayerNorm", []),
    "apex-rmsnorm": (kernels.Present(cuda=True, apex=True, transformer_engine=False, grad_accum_kernel=False),
                     "RMSNorm", []),
    # a GELU MLP without biases: Megatron's fused bias-GELU, on wherever bias fusions are, needs the bias
    "gelu-without-bias": (BARE_GPU, "LayerNorm", ["model.linear_bias=none"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {}
    for name, (present, normalization, overrides) in CASES.items():
        cfg = load_config(None, ["model.preset=tiny", "precision.dtype=bf16", "train.global_batch_size=2",
                                 "train.micro_batch_size=2", f"model.normalization={normalization}", *overrides],
                          world_size=1)
        runtime.init_distributed(cfg)
        k = kernels.choose(present, normalization=normalization)
        out[name] = {"kernels": k.transformer_config_kwargs(), "spec": k.spec}
        if k.spec == "te" and not kernels.importable("transformer_engine.pytorch"):
            k = dataclasses.replace(k, spec="local", sdpa_attention=True, apply_rope_fusion=False)
        try:
            state = build_train_state(cfg, vocab_size=padded_vocab_size(VOCAB), cuda=False, kernels=k)
            samples = windows_to_samples(synthetic_batch(0, global_batch=2, seq_length=cfg.model.seq_length, seed=1))
            out[name]["loss"] = train_step(state, [collate(samples, pause_id=PAUSE_ID)])["loss"]
        except Exception as exc:  # noqa: BLE001 — the test reports which case failed and how
            out[name]["error"] = f"{type(exc).__name__}: {exc}"
        runtime.destroy()
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
