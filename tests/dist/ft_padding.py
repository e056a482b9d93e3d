"""Finetuning steps on microbatches padded to their longest example against the same steps padded to seq_length.

Both runs start from the same pretrained weights and take the same samples (the real finetuning dataset and
`microbatches_from`); the reference pads every sample to `seq_length` positions as finetuning did before.
Prints the per-step losses, target-token counts and microbatch widths of both. With `--arms longest` and
parallel overrides (under torchrun), the padded-to-longest steps alone, for comparison with one process.
"""

import argparse
import json

from pause_megatron import checkpoint, runtime
from pause_megatron.data import collate, microbatches_from, pad_samples
from pause_megatron.finetune import build_datasets, finetune_config
from pause_megatron.job import vocab_size
from pause_megatron.tokenizer import PauseTokenizer
from pause_megatron.train import build_train_state, train_step

STEPS = 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True)
    # hellaswag: the sample rows' examples differ in length enough that microbatches get different widths
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--arms", default="longest,full")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = finetune_config(None, [f"task={args.task}", f"train.init_from={args.checkpoint}",
                                 f"data.task_dir={args.data_dir}", "pauses.m_ft=4", "train.global_batch_size=4",
                                 "train.micro_batch_size=2", "optim.warmup_steps=1", f"train.steps={STEPS}",
                                 "tracking.enabled=false", *args.overrides])
    tok = PauseTokenizer.load(checkpoint.tokenizer_path(args.checkpoint))
    train_ds, _ = build_datasets(cfg, tok)
    runtime.init_distributed(cfg)
    out = {}
    for arm in args.arms.split(","):
        state = build_train_state(cfg, vocab_size=vocab_size(cfg, tok), cuda=False)
        checkpoint.load(state, args.checkpoint, weights_only=True)
        losses, tokens, widths, positions = [], [], [], []
        for step in range(STEPS):
            start = step * cfg.train.global_batch_size
            batches = microbatches_from(train_ds, start=start, cfg=cfg, pause_id=tok.pause_id, dp_rank=0, dp_size=1)
            if arm == "full":
                batches = [collate(pad_samples([train_ds[i] for i in range(start + k * 2, start + k * 2 + 2)],
                                               length=cfg.model.seq_length, pad_id=tok.pad_id), pause_id=tok.pause_id)
                           for k in range(len(batches))]
            widths.append([b["tokens"].shape[1] for b in batches])
            result = train_step(state, batches)
            losses.append(result["loss"])
            tokens.append(result["tokens"])
            positions.append([result["positions"], result["width_sum"]])  # what training logs as its work
        out[arm] = {"losses": losses, "tokens": tokens, "widths": widths, "positions": positions}
    out["max_width"] = cfg.model.seq_length
    import torch

    if torch.distributed.get_rank() == 0:
        print("FTPAD " + json.dumps(out), flush=True)
    runtime.destroy()


if __name__ == "__main__":
    main()
