"""Greedy decoding of the tiny model, by full recomputation and with Megatron-Core's KV cache (one process).

`kv_decode.py --out OUT [key=value ...]` (config overrides, e.g. `model.position_embedding=learned_absolute`).
Writes JSON: the tokens each way, the largest difference of their per-step logits (also for a cached run
whose new tokens sit one position too far, the defect the comparison must see), the shape of the logits
the KV-cached prefill returned, and the same comparison through evaluation's own `greedy_generate` (its
`position_ids` matter with learned absolute positions; with RoPE, Megatron takes a cached token's position
from `sequence_len_offset`). Cached decoding runs inside `compat.inference_mode()`, as evaluation code must
(megatron-core >= 0.18).
"""

import argparse
import json

import torch

from pause_megatron import runtime
from pause_megatron.compat import inference_mode
from pause_megatron.config import load_config
from pause_megatron.decoding import greedy_generate
from pause_megatron.model import build_gpt
from pause_megatron.tokenizer import padded_vocab_size

VOCAB = 100
BATCH, PROMPT, NEW = 2, 10, 6


class Recorder:
    """The model as greedy_generate calls it, keeping the last position's logits of every call."""

    def __init__(self, model):
        self.model, self.last = model, []

    def __call__(self, **kwargs):
        logits = self.model(**kwargs)
        self.last.append(logits[0, -1].detach().float().clone())
        return logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(None, ["model.preset=tiny", *args.overrides], world_size=1)
    runtime.init_distributed(cfg)
    from megatron.core.inference.contexts import StaticInferenceContext

    model = build_gpt(cfg, vocab_size=padded_vocab_size(VOCAB), cuda=runtime.use_cuda()).eval()
    prompt = torch.randint(4, VOCAB - 1, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))

    def positions(start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length).unsqueeze(0).expand(BATCH, -1)

    def cached_decode(shift: int):
        """Greedy tokens and per-step last logits with the KV cache; `shift` moves where the new tokens go."""
        with inference_mode():
            context = StaticInferenceContext(BATCH, PROMPT + NEW)
            logits = model(prompt, positions(0, PROMPT), None, inference_context=context, runtime_gather_output=True)
            shape = list(logits.shape)
            context.sequence_len_offset += PROMPT + shift
            steps = [logits[:, -1]]
            tokens = [logits[:, -1].argmax(-1)]
            for step in range(NEW - 1):
                logits = model(tokens[-1].unsqueeze(1), positions(PROMPT + step, 1), None,
                               inference_context=context, runtime_gather_output=True)
                context.sequence_len_offset += 1
                steps.append(logits[:, -1])
                tokens.append(logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1), torch.stack(steps, dim=1), shape

    with torch.no_grad():
        tokens, full_logits = prompt, []
        for _ in range(NEW):
            logits = model(tokens, positions(0, tokens.shape[1]), None)
            full_logits.append(logits[:, -1])
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        full, full_logits = tokens[:, PROMPT:], torch.stack(full_logits, dim=1)
        cached, cached_logits, prefill_shape = cached_decode(0)
        # Off by one: each new token gets the RoPE position (and cache slot) of the token before it.
        _, shifted_logits, _ = cached_decode(-1)

    def max_diff(a, b):
        return float((a.float() - b.float()).abs().max())

    generate = {"cached": [], "full": [], "max_logit_diff": 0.0}
    for p in prompt.tolist():
        cached_run, full_run = Recorder(model), Recorder(model)
        generate["cached"].append(greedy_generate(cached_run, p, max_new_tokens=NEW))
        generate["full"].append(greedy_generate(full_run, p, max_new_tokens=NEW, use_cache=False))
        steps = min(len(cached_run.last), len(full_run.last))
        diff = max_diff(torch.stack(cached_run.last[:steps]), torch.stack(full_run.last[:steps]))
        generate["max_logit_diff"] = max(generate["max_logit_diff"], diff)

    with open(args.out, "w") as f:
        json.dump({"full": full.tolist(), "cached": cached.tolist(), "prefill_logits_shape": prefill_shape,
                   "max_logit_diff": max_diff(cached_logits, full_logits),
                   "shifted_max_logit_diff": max_diff(shifted_logits, full_logits),
                   "generate": generate,
                   "logit_scale": float(full_logits.float().std())}, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
