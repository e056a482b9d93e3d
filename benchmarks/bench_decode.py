"""Greedy decoding with Megatron-Core's KV cache against recomputing the whole sequence every step.

    python benchmarks/bench_decode.py [--new-tokens 256] [--prompt 32] [--repeats 3] [k=v overrides]

Same model (tiny preset, random weights: speed does not depend on them), same prompt, both decoders in one
process, alternated `--repeats` times; prints tokens/s of each and their ratio, and checks that both produce
the same tokens.
"""

import argparse
import json
import platform
import time

import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.evaluate import greedy_generate
from pause_megatron.model import build_gpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=tiny", f"model.seq_length={args.prompt + args.new_tokens}",
                             *args.overrides])
    runtime.init_distributed(cfg)
    model = build_gpt(cfg, vocab_size=32128, cuda=False).eval()
    prompt = torch.randint(10, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    times = {"kv_cache": [], "recompute": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, cache in (("kv_cache", True), ("recompute", False)):
            start = time.perf_counter()
            tokens[name] = greedy_generate(model, prompt, max_new_tokens=args.new_tokens, use_cache=cache)
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "new_tokens": args.new_tokens, "prompt": args.prompt,
        "kv_cache_tokens_per_s": args.new_tokens / best["kv_cache"],
        "recompute_tokens_per_s": args.new_tokens / best["recompute"],
        "speedup": best["recompute"] / best["kv_cache"],
        "same_tokens": tokens["kv_cache"] == tokens["recompute"],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(json.dumps(result, indent=1))
    runtime.destroy()


if __name__ == "__main__":
    main()
