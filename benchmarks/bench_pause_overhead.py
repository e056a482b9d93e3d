"""Step-time cost of the pause machinery on CPU: PausePT batches against the same run with ratio 0 (StdPT).

    python benchmarks/bench_pause_overhead.py [--steps 30] [--data DIR]

Both variants come from the same data prep (DIR, built here from a generated C4 sample if not given), so
they differ only by the pauses. One process, one model: steps alternate between the two variants so that
machine noise hits both alike; the first steps are warm-up. The pause machinery at training time is the loss
mask (pause targets ignored) and the all-token loss that validation reports; the FLOPs are the same.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.data import build_pretrain_datasets, load_tokenizer, microbatches_from
from pause_megatron.job import vocab_size
from pause_megatron.train import build_train_state, train_step


def build_data(root: str) -> str:
    out = os.path.join(root, "shards")
    subprocess.run([sys.executable, "-m", "data_prep.c4_sample", os.path.join(root, "json"), "--files", "2",
                    "--docs-per-file", "300"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_prep.build_c4", "build", "--input", os.path.join(root, "json"),
                    "--output", out, "--seq-length", "128", "--vocab-size", "1000", "--workers", "2"], check=True,
                   capture_output=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--data")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = args.data or build_data(tmp)
    total = args.steps + args.warmup
    common = ["model.preset=tiny", f"data.path={data}", "train.micro_batch_size=8", "train.global_batch_size=32",
              f"train.steps={total + 1}", "optim.warmup_steps=1", f"train.output_dir={tmp}/out"]
    cfg = {v: load_config(None, [*common, f"data.variant={v}"]) for v in ("pause", "std")}
    runtime.init_distributed(cfg["pause"])
    tok = load_tokenizer(cfg["pause"])
    state = build_train_state(cfg["pause"], vocab_size=vocab_size(cfg["pause"], tok), cuda=False)
    data_sets = {v: build_pretrain_datasets(c, tok, train_samples=total * 32, valid_samples=0,
                                            cache_dir=f"{tmp}/cache_{v}")[0] for v, c in cfg.items()}
    times = {"pause": [], "std": []}
    for i in range(total):
        for v in ("pause", "std") if i % 2 == 0 else ("std", "pause"):
            start = time.perf_counter()
            mbs = microbatches_from(data_sets[v], start=i * 32, cfg=cfg[v], pause_id=tok.pause_id, dp_rank=0, dp_size=1)
            train_step(state, mbs)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - start)
    med = {v: float(np.median(t)) for v, t in times.items()}
    print(json.dumps({"steps_each": args.steps, "median_step_s": med, "pause_over_std": med["pause"] / med["std"],
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}, indent=1))
    runtime.destroy()


if __name__ == "__main__":
    main()
