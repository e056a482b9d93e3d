"""`make demo`: the main job on its embedded default, on a CPU in a few minutes.

A C4-format sample (generated: nothing is downloaded) -> data_prep/build_c4.py (std + pause shards) ->
pretraining the tiny decoder with Megatron-Core on 2 CPU ranks (TP=2), PausePT and StdPT, tracked in MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

OUT = "runs/demo"
SEQ = 128


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    env_py = sys.executable
    run(env_py, "-m", "data_prep.c4_sample", f"{OUT}/c4_json", "--files", "2", "--docs-per-file", "400")
    run(env_py, "-m", "data_prep.build_c4", "build", "--input", f"{OUT}/c4_json", "--output", f"{OUT}/c4_{SEQ}",
        "--seq-length", str(SEQ), "--vocab-size", "2000", "--workers", "2")
    finals = {}
    for variant in ("pause", "std"):
        run(env_py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "pause_megatron.pretrain", "--config", "recipes/pretrain_tiny.yaml", f"data.variant={variant}",
            f"train.output_dir={OUT}/pretrain_{variant}")
        with open(f"{OUT}/pretrain_{variant}/metrics.jsonl") as f:
            finals[variant] = [json.loads(line) for line in f][-1]
    print("\nfinal validation loss on non-pause targets (tiny model, 60 steps):")
    for variant, m in finals.items():
        print(f"  {variant:5s}  val/loss {m['val/loss']:.3f}   val/all_token_loss {m['val/all_token_loss']:.3f}")
    print(f"\ncheckpoints and metrics: {OUT}/pretrain_*/   MLflow: mlflow ui --backend-store-uri sqlite:///{OUT}/mlflow.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
