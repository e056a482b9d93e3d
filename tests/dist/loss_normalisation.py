"""One training step of the tiny model on two samples with very different numbers of unmasked targets.

Sample A is mostly pauses (4 targets count), sample B has none (128 count). The step runs once as two
microbatches ([A], [B]) and once, from the same weights, as one microbatch ([A, B]). Per-token normalisation
(the loss summed over all counted targets of the step, divided by their count) gives both the same gradient;
normalising per microbatch (Megatron's calculate_per_token_loss=False) weighs A's 4 targets as much as B's 128.
Writes JSON: loss, token count and gradient norm of each way.
"""

import argparse
import json

import numpy as np
import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.data import collate, windows_to_samples
from pause_megatron.tokenizer import padded_vocab_size
from pause_megatron.train import build_train_state, train_step

VOCAB = 100
PAUSE_ID = 99
COUNTED_IN_A = 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = load_config(None, ["model.preset=tiny", "train.global_batch_size=2", "train.micro_batch_size=1",
                             "train.steps=2", "optim.warmup_steps=0"], world_size=1)
    runtime.init_distributed(cfg)
    state = build_train_state(cfg, vocab_size=padded_vocab_size(VOCAB), cuda=runtime.use_cuda())
    seq = cfg.model.seq_length
    rng = np.random.default_rng(0)
    windows = rng.integers(4, PAUSE_ID, size=(2, seq + 1))
    windows[0, COUNTED_IN_A + 1:] = PAUSE_ID  # A: only its first 4 targets are not pauses
    a, b = windows_to_samples(windows)
    start = [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in chunk.state_dict().items()}
             for chunk in state.model]

    out = {}
    for name, microbatches in (("two_microbatches", [[a], [b]]), ("one_microbatch", [[a, b]])):
        for chunk, weights in zip(state.model, start):
            chunk.load_state_dict(weights)
        r = train_step(state, [collate(mb, pause_id=PAUSE_ID) for mb in microbatches])
        out[name] = {"loss": r["loss"], "tokens": r["tokens"], "grad_norm": r["grad_norm"]}
    with open(args.out, "w") as f:
        json.dump(out, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
