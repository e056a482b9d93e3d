"""Train the tiny model a few steps under one parallel layout (run by torchrun from the tests).

Every layout reads the same synthetic pause-injected windows and, with --init-from, starts from the same
weights (a dist_checkpointing checkpoint, resharded on load), so losses can be compared across layouts.
"""

import argparse
import json
import sys

import numpy as np
import torch

from pause_megatron import checkpoint, runtime
from pause_megatron.config import load_config
from pause_megatron.data import collate, microbatch_indices, windows_to_samples
from pause_megatron.pauses import inject_pauses
from pause_megatron.tokenizer import padded_vocab_size
from pause_megatron.train import build_train_state, train_step

VOCAB = 100  # real ids 0..98, <pause> = 99
PAUSE_ID = 99


def synthetic_batch(step: int, *, global_batch: int, seq_length: int, seed: int) -> np.ndarray:
    """[global_batch, seq_length + 1] windows of random tokens with 10% pauses, fixed by (seed, step)."""
    rng = np.random.default_rng([seed, step])
    rows = []
    for _ in range(global_batch):
        window = rng.integers(4, PAUSE_ID, size=seq_length + 1)
        rows.append(inject_pauses(window, pause_id=PAUSE_ID, seq_length=seq_length + 1, rng=rng))
    return np.stack(rows)


@torch.no_grad()
def scores(model) -> dict:
    """Continuation log-likelihoods of the trained model, batched with logits only at the continuations
    (`score_batch`) and from the logits of every position (the reference), under this layout's TP."""
    from pause_megatron.decoding import forward, score_batch

    model.eval()
    rng = np.random.default_rng(1)
    rows = [(rng.integers(4, PAUSE_ID, size=c).tolist(), rng.integers(4, PAUSE_ID, size=x).tolist())
            for c, x in ((10, 5), (30, 3), (20, 8))]
    full = []
    for c, x in rows:
        ids = torch.tensor([c + x])
        logprobs = torch.log_softmax(forward(model, ids, torch.arange(ids.shape[1])[None])[0], -1)
        full.append(float(logprobs[len(c) - 1: len(c) - 1 + len(x)].gather(1, torch.tensor(x)[:, None]).sum()))
    return {"scores": [ll for ll, _ in score_batch(model, rows, vocab_size=VOCAB)], "full_logits_scores": full}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--init-from", default=None, help="checkpoint with the starting weights")
    ap.add_argument("--save-init", default=None, help="save the freshly initialised weights here and exit")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(None, ["model.preset=tiny", *args.overrides], world_size=runtime.world_size_from_env())
    runtime.init_distributed(cfg)
    from megatron.core import parallel_state as ps

    state = build_train_state(cfg, vocab_size=padded_vocab_size(VOCAB, tensor_parallel=cfg.parallel.tensor),
                              cuda=runtime.use_cuda())
    if args.save_init:
        checkpoint.save(state, args.save_init)
        runtime.destroy()
        return
    if args.init_from:
        checkpoint.load(state, args.init_from, weights_only=True)
    record = []
    for step in range(cfg.train.steps):
        batch = synthetic_batch(step, global_batch=cfg.train.global_batch_size, seq_length=cfg.model.seq_length,
                                seed=cfg.train.seed)
        samples = windows_to_samples(batch)
        groups = microbatch_indices(start=0, global_batch_size=len(samples), micro_batch_size=cfg.train.micro_batch_size,
                                    dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
        mbs = [collate([samples[i] for i in idx], pause_id=PAUSE_ID) for idx in groups]
        record.append(train_step(state, mbs))
    if cfg.parallel.pipeline == 1:  # scoring runs the whole model in one forward
        record[-1].update(scores(state.model[0]))
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(record, f)
    runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
