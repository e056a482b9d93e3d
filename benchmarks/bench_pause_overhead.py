"""Step-time cost of the pause machinery on CPU: the real pause path against the same batches without it,
and the cost of injecting the pauses online (pauses.source=online) against reading the pause shards.

    python benchmarks/bench_pause_overhead.py [--steps 40] [--warmup 5] [--data DIR] [--ratio R]

Both arms train one model on the same PausePT samples (DIR, built here from a generated C4 sample if not
given), so they run the same FLOPs on the same tokens; they differ only by what the pause rule adds at
training time:
  pause     data.collate (loss mask x pause_loss_mask, plus the all-token mask) and train._loss_func (the
            masked sum and count, plus the all-token sum that validation reports);
  baseline  the GPTDataset samples stacked as they are (no pause mask, no all-token mask) and a loss that is
            only the masked sum and count (what a plain Megatron GPT step computes);
  online    the pause arm's step on samples read from the std shards with the pauses injected as each window
            is read, at --ratio (default: the pause shards' own ratio, so its samples are the pause arm's).
Each step is timed from fetching its samples to the end of the optimizer step; the fetch (reading the samples
and building the microbatches) is also timed alone. The arms take turns in rotating order so that machine noise
(other processes, thermal drift) hits all alike; the first steps are warm-up. Prints, for wall-clock and for
this process's CPU time, the median step and fetch time of each arm, the ratios pause/baseline and
online/pause with the median (and quartiles) of the per-step ratios; and the machine with its load average.
On a shared machine the wall-clock figures are noisy (other processes take the cores); the CPU-time figures
much less so.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch

from pause_megatron import runtime, train
from pause_megatron.config import load_config
from pause_megatron.data import build_pretrain_datasets, load_tokenizer, microbatch_indices, microbatches_from
from pause_megatron.job import vocab_size
from pause_megatron.train import build_train_state, train_step

GLOBAL_BATCH, MICRO_BATCH = 32, 8


def build_data(root: str) -> str:
    out = os.path.join(root, "shards")
    subprocess.run([sys.executable, "-m", "data_prep.c4_sample", os.path.join(root, "json"), "--files", "2",
                    "--docs-per-file", "300"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_prep.build_c4", "build", "--input", os.path.join(root, "json"),
                    "--output", out, "--seq-length", "128", "--vocab-size", "1000", "--workers", "2"], check=True,
                   capture_output=True)
    return out


def plain_microbatches(dataset, *, start: int) -> list[dict]:
    """The baseline's batches: GPTDataset's samples stacked, with its own loss mask only."""
    out = []
    for idx in microbatch_indices(start=start, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                                  dp_rank=0, dp_size=1):
        samples = [dataset[i] for i in idx]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        batch["tokens"], batch["labels"] = batch["tokens"].long(), batch["labels"].long()
        out.append(batch)
    return out


def plain_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    loss_mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def plain_forward_step(data_iterator, model, *, device: torch.device):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                   labels=batch["labels"])
    return output, partial(plain_loss, batch["loss_mask"])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--data")
    ap.add_argument("--ratio", type=float, help="the online arm's pause ratio (default: the pause shards')")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = args.data or build_data(tmp)
    total = args.steps + args.warmup
    overrides = ["model.preset=tiny", f"data.path={data}", f"train.micro_batch_size={MICRO_BATCH}",
                 f"train.global_batch_size={GLOBAL_BATCH}", f"train.steps={3 * total + 1}", "optim.warmup_steps=1",
                 f"train.output_dir={tmp}/out", "data.variant=pause"]
    cfg = load_config(None, overrides)
    runtime.init_distributed(cfg)
    tok = load_tokenizer(cfg)
    state = build_train_state(cfg, vocab_size=vocab_size(cfg, tok), cuda=False)
    dataset = build_pretrain_datasets(cfg, tok, train_samples=total * GLOBAL_BATCH, valid_samples=0,
                                      cache_dir=f"{tmp}/cache")[0]
    ratio = cfg.pauses.ratio if args.ratio is None else args.ratio
    online_cfg = load_config(None, [*overrides, "pauses.source=online", f"pauses.ratio={ratio}"])
    online = build_pretrain_datasets(online_cfg, tok, train_samples=total * GLOBAL_BATCH, valid_samples=0,
                                     cache_dir=f"{tmp}/cache_online")[0]
    pause_forward_step = train._forward_step

    def step(arm: str, start: int) -> tuple[float, float, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if arm == "baseline":
            mbs = plain_microbatches(dataset, start=start)
            train._forward_step = plain_forward_step  # what _run_schedule hands to Megatron's schedule
        else:
            mbs = microbatches_from(dataset if arm == "pause" else online, start=start, cfg=cfg,
                                    pause_id=tok.pause_id, dp_rank=0, dp_size=1)
            train._forward_step = pause_forward_step
        t1, c1 = time.perf_counter(), time.process_time()
        try:
            train_step(state, mbs)
        finally:
            train._forward_step = pause_forward_step
        return time.perf_counter() - t0, time.process_time() - c0, t1 - t0, c1 - c0

    load_before = os.getloadavg()
    arms = ("pause", "baseline", "online")
    # per clock (wall, cpu: this process's CPU time, what other processes' load disturbs least), step or fetch
    times = {(clock, part): {arm: [] for arm in arms} for clock in ("wall", "cpu") for part in ("step", "fetch")}
    for i in range(total):
        order = arms[i % 3:] + arms[:i % 3]
        got = {arm: step(arm, i * GLOBAL_BATCH) for arm in order}  # same sample indices for every arm
        if i >= args.warmup:
            for arm, (w, c, fw, fc) in got.items():
                for key, value in ((("wall", "step"), w), (("cpu", "step"), c), (("wall", "fetch"), fw),
                                   (("cpu", "fetch"), fc)):
                    times[key][arm].append(value)

    def ratio_of(t: dict, a: str, b: str) -> dict:
        pairs = np.array(t[a]) / np.array(t[b])
        return {"of_medians": float(np.median(t[a]) / np.median(t[b])), "median_per_step": float(np.median(pairs)),
                "per_step_iqr": [float(np.percentile(pairs, 25)), float(np.percentile(pairs, 75))]}

    def summary(clock: str) -> dict:
        step_t, fetch_t = times[(clock, "step")], times[(clock, "fetch")]
        return {"median_step_s": {arm: float(np.median(t)) for arm, t in step_t.items()},
                "median_fetch_s": {arm: float(np.median(t)) for arm, t in fetch_t.items()},
                "pause_over_baseline": ratio_of(step_t, "pause", "baseline"),
                "online_over_pause": ratio_of(step_t, "online", "pause"),
                "online_extra_fetch_s_per_step": float(np.median(fetch_t["online"]) - np.median(fetch_t["pause"]))}

    print(json.dumps({"steps_each": args.steps, "online_ratio": ratio, "samples_per_step": GLOBAL_BATCH,
                      "seq_length": cfg.model.seq_length, "wall": summary("wall"), "cpu": summary("cpu"),
                      "machine": machine(), "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]]},
                     indent=1))
    runtime.destroy()


if __name__ == "__main__":
    main()
