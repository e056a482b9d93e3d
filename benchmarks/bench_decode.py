"""Greedy decoding with Megatron-Core's KV cache against recomputing the whole sequence every step.

    python benchmarks/bench_decode.py [--new-tokens 256] [--prompt 32] [--repeats 3] [--profile N] [k=v overrides]

Same model (tiny preset, random weights: speed does not depend on them), same prompt, both decoders in one
process, alternated `--repeats` times; prints tokens/s of each and their ratio, and checks that both produce
the same tokens. `--profile N` then runs the KV-cached decoder once more under cProfile and prints the N
functions by cumulative time (where a cached step's time goes, module by module).
"""

import argparse
import json
import os
import platform
import time

import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.decoding import greedy_generate
from pause_megatron.model import build_gpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=tiny", f"model.seq_length={args.prompt + args.new_tokens}",
                             *args.overrides])
    runtime.init_distributed(cfg)
    model = build_gpt(cfg, vocab_size=32128, cuda=False).eval()
    prompt = torch.randint(10, 32000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    times = {"kv_cache": [], "recompute": []}
    cpu = {"kv_cache": [], "recompute": []}  # this process's CPU time: steadier than wall-clock on a shared machine
    tokens = {}
    for _ in range(args.repeats):
        for name, cache in (("kv_cache", True), ("recompute", False)):
            start, cpu_start = time.perf_counter(), time.process_time()
            tokens[name] = greedy_generate(model, prompt, max_new_tokens=args.new_tokens, use_cache=cache)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    result = {
        "new_tokens": args.new_tokens, "prompt": args.prompt,
        "kv_cache_tokens_per_s": args.new_tokens / best["kv_cache"],
        "recompute_tokens_per_s": args.new_tokens / best["recompute"],
        "speedup": best["recompute"] / best["kv_cache"],
        "kv_cache_tokens_per_cpu_s": args.new_tokens / best_cpu["kv_cache"],
        "recompute_tokens_per_cpu_s": args.new_tokens / best_cpu["recompute"],
        "speedup_cpu_time": best_cpu["recompute"] / best_cpu["kv_cache"],
        "same_tokens": tokens["kv_cache"] == tokens["recompute"],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=1))
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(greedy_generate, model, prompt, max_new_tokens=args.new_tokens, use_cache=True)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    runtime.destroy()


if __name__ == "__main__":
    main()
