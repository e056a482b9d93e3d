"""SDPAttention against Megatron's DotProductAttention in one tiny GPTModel (fp32, one process).

Two models with the same weights differ only in the core-attention submodule of the local spec. Writes JSON:
largest differences of training loss, logits and every parameter gradient; per-step logits of KV-cached
decoding (one token, then two tokens at a time: a query shorter than its keys) against full recomputation.
"""

import argparse
import dataclasses
import json

import torch

from pause_megatron import runtime
from pause_megatron.compat import inference_mode
from pause_megatron.config import load_config
from pause_megatron.model import build_gpt, kernel_choice
from pause_megatron.tokenizer import padded_vocab_size

VOCAB, BATCH, PROMPT, NEW = 100, 2, 12, 6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=tiny"], world_size=1)
    runtime.init_distributed(cfg)
    from megatron.core.inference.contexts import StaticInferenceContext

    sdpa_k = kernel_choice(cfg, cuda=False)
    assert sdpa_k.sdpa_attention
    vocab = padded_vocab_size(VOCAB)
    sdpa = build_gpt(cfg, vocab_size=vocab, cuda=False, kernels=sdpa_k)
    mega = build_gpt(cfg, vocab_size=vocab, cuda=False, kernels=dataclasses.replace(sdpa_k, sdpa_attention=False))
    mega.load_state_dict(sdpa.state_dict())
    names = {type(m).__name__ for m in sdpa.modules()} ^ {type(m).__name__ for m in mega.modules()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, cfg.model.seq_length), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, cfg.model.seq_length), generator=g)
    pos = torch.arange(cfg.model.seq_length).expand(BATCH, -1)
    out = {"swapped_modules": sorted(names)}

    losses, grads, logits = [], [], []
    for model in (sdpa, mega):
        model.zero_grad()
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            logits.append(model(tokens, pos, None).float())
    out["loss"] = losses
    out["logits_max_abs_diff"] = float((logits[0] - logits[1]).abs().max())
    out["grad_max_rel_diff"] = max(float((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp_min(1e-12))
                                   for n in grads[1])

    def greedy(model, cached: bool):
        """Greedy tokens and the last-position logits of every step, with or without the KV cache."""
        seq, steps = tokens[:, :PROMPT], []
        ctx = StaticInferenceContext(BATCH, PROMPT + NEW) if cached else None
        feed = seq
        while seq.shape[1] < PROMPT + NEW:
            if cached:
                start = ctx.sequence_len_offset
                lg = model(feed, torch.arange(start, start + feed.shape[1]).expand(BATCH, -1), None,
                           inference_context=ctx, runtime_gather_output=True).float()
                ctx.sequence_len_offset += feed.shape[1]
            else:
                lg = model(seq, torch.arange(seq.shape[1]).expand(BATCH, -1), None,
                           runtime_gather_output=True).float()  # megatron-core >= 0.19 asserts it in inference
            steps.append(lg[:, -1])
            feed = lg[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, feed], dim=1)
        return seq[:, PROMPT:], torch.stack(steps)

    def teacher_forced(model, chunk: int):
        """Logits of every position of `tokens[:, :PROMPT + NEW]`, fed to the KV cache `chunk` tokens at a time
        after the prompt (chunk > 1: queries shorter than keys), against one full forward."""
        ctx = StaticInferenceContext(BATCH, PROMPT + NEW)
        diffs, start = [], 0
        full = model(tokens[:, :PROMPT + NEW], torch.arange(PROMPT + NEW).expand(BATCH, -1), None,
                     runtime_gather_output=True).float()
        for end in [PROMPT, *range(PROMPT + chunk, PROMPT + NEW + 1, chunk)]:
            # In inference mode Megatron returns the logits of the last fed position only.
            lg = model(tokens[:, start:end], torch.arange(start, end).expand(BATCH, -1), None,
                       inference_context=ctx, runtime_gather_output=True).float()[:, -1]
            diffs.append(float((full[:, end - 1] - lg).abs().max()))
            ctx.sequence_len_offset += end - start
            start = end
        return max(diffs)

    for name, model in (("sdpa", sdpa), ("megatron", mega)):
        model.eval()
        with torch.no_grad(), inference_mode():
            full_tokens, full_logits = greedy(model, cached=False)
            kv_tokens, kv_logits = greedy(model, cached=True)
            if name == "sdpa":
                out["sdpa_chunk2_max_abs_diff"] = teacher_forced(model, 2)
                out["sdpa_chunk1_max_abs_diff"] = teacher_forced(model, 1)
        out[f"{name}_greedy_equal"] = bool((full_tokens == kv_tokens).all())
        out[f"{name}_kv_logits_max_abs_diff"] = float((full_logits - kv_logits).abs().max())
        out[f"{name}_full_logits"] = full_logits
    out["sdpa_vs_megatron_decode_logits_max_abs_diff"] = float((out.pop("sdpa_full_logits")
                                                                - out.pop("megatron_full_logits")).abs().max())
    with open(args.out, "w") as f:
        json.dump(out, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
