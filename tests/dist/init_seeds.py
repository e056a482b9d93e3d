"""Build the tiny model under one parallel layout and report which pipeline stages start from equal weights.

Run by torchrun from tests/test_init_seeds.py: rank 0 writes {"stages": S, "equal": [[a, b], ...]} to --out,
the pairs of stages whose first transformer layer has the same `linear_fc1.weight`.
"""

import argparse
import json

import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.model import build_model_chunks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=tiny", *args.overrides], world_size=runtime.world_size_from_env())
    runtime.init_distributed(cfg)
    from megatron.core import parallel_state as ps

    chunks = build_model_chunks(cfg, vocab_size=128, cuda=False)
    # one entry per model chunk: (global virtual stage, the fc1 weight of its first layer)
    mine = []
    for v, chunk in enumerate(chunks):
        weight = chunk.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
        mine.append((v * cfg.parallel.pipeline + ps.get_pipeline_model_parallel_rank(), weight))
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    if torch.distributed.get_rank() == 0:
        stages = dict(item for part in gathered for item in part)
        equal = [[a, b] for a in sorted(stages) for b in sorted(stages) if a < b and torch.equal(stages[a], stages[b])]
        with open(args.out, "w") as f:
            json.dump({"stages": len(stages), "equal": equal}, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
