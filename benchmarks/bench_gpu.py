"""GPU pretraining throughput: tokens/s, TFLOP/s and MFU per GPU for 130m and 1b, bf16 and fp8, one GPU,
each against a plain-PyTorch peer of the same shape and step (benchmarks/peer_model.py) in the same process.

    python benchmarks/bench_gpu.py [--steps 8] [--warmup 3] [--only 130m:bf16,1b:bf16,1b:fp8]
    python benchmarks/bench_gpu.py --tiny        (the tiny preset on the CPU emulation: a smoke test)

Synthetic pause-injected token batches (throughput does not depend on the text), the real training step
(Megatron-Core GPTModel, spec and kernels from pause_megatron.kernels, Float16Module, DDP, optimizer,
pipeline schedule), seq 2048. Ends with a markdown table with the ratios project/peer for tokens/s and memory.
Run through benchmarks/gpu_benchmark.sh, which installs what it needs.
"""

import argparse
import gc
import json
import sys
import time

import numpy as np
import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.data import collate, microbatch_indices, windows_to_samples
from pause_megatron.pauses import inject_pauses
from pause_megatron.perf import memory_gb, model_flops_per_token, peak_tflops
from pause_megatron.train import build_train_state, train_step

import peer_model

VOCAB, PAUSE = 32128, 32000
MICRO = {"130m": 8, "1b": 4, "tiny": 2}  # sequences per microbatch that fit one 80 GB GPU with room to spare


def batch(rng, n, seq):
    rows = [inject_pauses(rng.integers(10, PAUSE, size=seq + 1), pause_id=PAUSE, seq_length=seq + 1, rng=rng)
            for _ in range(n)]
    return windows_to_samples(np.stack(rows))


def _time(step_fn, *, steps: int, warmup: int, cuda: bool) -> float:
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step_fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _reset_memory(cuda: bool) -> None:
    """Free what the previous side left before measuring the next one's peak. Megatron's DDP hooks form
    reference cycles, so the project's model survives `del` until the cycle collector runs."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(preset: str, precision: str, *, steps: int, warmup: int, cuda: bool) -> dict:
    micro = MICRO[preset]
    overrides = [f"model.preset={preset}", "precision.dtype=bf16", f"train.micro_batch_size={micro}",
                 f"train.global_batch_size={micro * 4}", f"train.steps={steps + warmup + 1}", "optim.warmup_steps=1"]
    if precision == "fp8":
        overrides += ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"]
    cfg = load_config(None, overrides, world_size=1)
    runtime.init_distributed(cfg)
    rng = np.random.default_rng(0)
    samples = batch(rng, cfg.train.global_batch_size, cfg.model.seq_length)
    groups = microbatch_indices(start=0, global_batch_size=len(samples), micro_batch_size=micro, dp_rank=0, dp_size=1)
    mbs = [collate([samples[i] for i in g], pause_id=PAUSE) for g in groups]
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    flops = model_flops_per_token(cfg, vocab_size=VOCAB) * tokens
    peak = peak_tflops(cuda=cuda)
    result = {"preset": preset, "precision": precision, "gpu": torch.cuda.get_device_name() if cuda else "cpu"}

    _reset_memory(cuda)
    try:  # an out-of-memory here must not leave the process group up for the next row
        state = build_train_state(cfg, vocab_size=VOCAB, cuda=cuda)
        step = _time(lambda: train_step(state, mbs), steps=steps, warmup=warmup, cuda=cuda)
        result.update(step_s=step, tokens_per_s=tokens / step, tflops_per_gpu=flops / step / 1e12,
                      mfu=flops / step / 1e12 / peak if peak else None, peak_tflops=peak,
                      memory_gb=memory_gb(cuda))
        del state
    finally:
        runtime.destroy()

    _reset_memory(cuda)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    model, opt = peer_model.build(cfg, vocab=VOCAB, device=device)
    step = _time(lambda: peer_model.step(model, opt, mbs, device), steps=steps, warmup=warmup, cuda=cuda)
    result.update(peer_tokens_per_s=tokens / step, peer_tflops_per_gpu=flops / step / 1e12,
                  peer_memory_gb=memory_gb(cuda))
    result["ratio_tokens_per_s"] = result["tokens_per_s"] / result["peer_tokens_per_s"]
    result["ratio_memory"] = result["memory_gb"] / result["peer_memory_gb"]
    del model, opt
    _reset_memory(cuda)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="130m:bf16,130m:fp8,1b:bf16,1b:fp8")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, 2 steps, on the CPU: checks the script runs")
    args = ap.parse_args()
    cuda = runtime.use_cuda()
    if args.tiny:
        args.only, args.steps, args.warmup = "tiny:bf16", 2, 1
    elif not cuda:
        print("error: no GPU (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    rows = []
    for item in args.only.split(","):
        preset, precision = item.split(":")
        try:
            rows.append(measure(preset, precision, steps=args.steps, warmup=args.warmup, cuda=cuda))
        except Exception as exc:  # noqa: BLE001 — report the failure in the table, keep measuring the rest
            rows.append({"preset": preset, "precision": precision, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | precision | tokens/s | TFLOP/s per GPU | MFU | memory GB | peer tokens/s | peer memory GB "
          "| tokens/s project/peer | memory project/peer |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['precision']} | failed: {r['error'][:80]} | | | | | | | |")
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"| {r['preset']} | {r['precision']} | {r['tokens_per_s']:,.0f} | {r['tflops_per_gpu']:.0f} | {mfu} "
                  f"| {r['memory_gb']:.1f} | {r['peer_tokens_per_s']:,.0f} | {r['peer_memory_gb']:.1f} "
                  f"| {r['ratio_tokens_per_s']:.2f} | {r['ratio_memory']:.2f} |")
    print(f"\nGPU: {torch.cuda.get_device_name() if cuda else 'none (CPU emulation)'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
