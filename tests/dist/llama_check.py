"""Llama-family import/export against transformers' own models, three architectures in one process: one JSON line.

    python tests/dist/llama_check.py --tokenizer TOKENIZER.model --out DIR

For each case (a Llama with Llama 3 RoPE scaling and untied embeddings, a Qwen2 with QKV biases and tied
embeddings, a SmolLM2-like Llama with tied embeddings and one key/value head): a random transformers model of a
tiny shape is saved with the SentencePiece tokenizer (without `<pause>`, as a model from elsewhere), imported
(import-hf), run by our Megatron model next to transformers', exported again (export-hf) and read back.
Reports, per case, the largest logit difference, the same difference against transformers' model with one
property broken (to show what the tolerance tells apart) and whether every exported tensor equals the original.
"""

import argparse
import json
import os

os.environ["PAUSE_MEGATRON_CPU"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as pb  # noqa: E402

from pause_megatron import hf as hf_  # noqa: E402
from pause_megatron import runtime  # noqa: E402
from pause_megatron.decoding import forward  # noqa: E402
from pause_megatron.evaluate import load_for_inference  # noqa: E402
from pause_megatron.model import unwrap  # noqa: E402

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128, initializer_range=0.2, hidden_act="silu")
# rope_theta 10000 with head_dim 16: the two lowest of the 8 frequencies have wavelengths above Llama 3's
# high-frequency cut-off (8192 / 4), so the scaling moves them visibly within 128 positions
CASES = {
    "llama": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=False,
                                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                       tie_word_embeddings=True)),
    "smollm2": ("LlamaForCausalLM", dict(num_key_value_heads=1, rope_theta=100000.0, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True)),
}


def make(kind: str, out: str, tokenizer: bytes) -> int:
    """A random transformers model of `kind` saved at `out` with the tokenizer minus <pause>; its vocab size."""
    import transformers

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer)
    if proto.pieces[-1].piece == "<pause>":
        del proto.pieces[-1]
    cls, extra = CASES[kind]
    config = getattr(transformers, cls.replace("ForCausalLM", "Config"))(vocab_size=len(proto.pieces),
                                                                        **SHAPE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config)
    with torch.no_grad():  # non-zero biases and norms unlike 1, so that a wrong mapping of any of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(proto.SerializeToString())
    return len(proto.pieces)


def logits_diff(model, hf, rows, n):
    with torch.no_grad():
        return max(float((forward(model, x, torch.arange(x.shape[1])[None])[0, :, :n]
                          - hf(x).logits[0, :, :n]).abs().max()) for x in rows)


def broken(kind: str, hf_dir: str):
    """transformers' model of `hf_dir` with the property this case checks broken: RoPE scaling dropped (llama),
    QKV biases zeroed (qwen2), gate and up swapped (smollm2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    if kind == "llama":
        config.rope_scaling = None
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=config, local_files_only=True,
                                                 torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if kind == "qwen2":
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.zero_()
            if kind == "smollm2":
                gate = layer.mlp.gate_proj.weight.clone()
                layer.mlp.gate_proj.weight.copy_(layer.mlp.up_proj.weight)
                layer.mlp.up_proj.weight.copy_(gate)
    return model


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tokenizer = open(args.tokenizer, "rb").read()
    report = {}
    for kind in CASES:
        x_dir, ckpt, y_dir = (os.path.join(args.out, f"{kind}-{s}") for s in ("hf", "ckpt", "export"))
        n = make(kind, x_dir, tokenizer)
        hf_.import_(x_dir, ckpt)
        model, cfg, tok = load_for_inference(ckpt, ["precision.dtype=fp32", "pauses.m_inf=0"])
        model = unwrap(model)
        hf = AutoModelForCausalLM.from_pretrained(x_dir, local_files_only=True, torch_dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, n, (1, cfg.model.seq_length), generator=g) for _ in range(2)]
        r = {"max_abs_diff": logits_diff(model, hf, rows, n), "broken_diff": logits_diff(model, broken(kind, x_dir),
                                                                                          rows, n),
             "logit_scale": float(hf(rows[0]).logits.abs().max()), "config": cfg.model.__dict__,
             "tied": not cfg.model.untie_embeddings}
        runtime.destroy()
        hf_.export(ckpt, y_dir)
        x, y = load_file(os.path.join(x_dir, "model.safetensors")), load_file(os.path.join(y_dir, "model.safetensors"))
        r["same_names"] = sorted(x) == sorted(y)
        # embedding rows beyond the HF model's (<pause>, padding) are ours; the rest must come back unchanged
        r["unequal"] = [k for k in x if k not in y or not torch.equal(y[k][: x[k].shape[0]], x[k])]
        xc, yc = (json.load(open(os.path.join(d, "config.json"))) for d in (x_dir, y_dir))
        r["config_diff"] = {k: [xc[k], yc.get(k)] for k in ("architectures", "num_key_value_heads", "rope_theta",
                                                             "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
                                                             "intermediate_size", "hidden_act") if xc[k] != yc.get(k)}
        report[kind] = r
    print(json.dumps(report))


if __name__ == "__main__":
    main()
