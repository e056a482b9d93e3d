"""Pretraining entry point: `python -m pause_megatron.pretrain --config recipes/pretrain_130m_pause.yaml k=v ...`.

Started by torchrun (one process per GPU) or by srun (one task per GPU); see slurm/. Resumes from the newest
checkpoint in `train.output_dir` if there is one.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: a stop signal during start-up is kept, not fatal
    from pause_megatron import stop_signals

    stop_signals.catch()

import argparse
import os
import sys
from typing import Optional

import torch

from pause_megatron import checkpoint, runtime
from pause_megatron.config import ConfigError, load_config
from pause_megatron.data import MANIFEST, DataError, build_pretrain_datasets, load_tokenizer
from pause_megatron.job import ResumeRefused, add_tracking_args, check_start, run_job, tags_from
from pause_megatron.tokenizer import TokenizerMismatch


def parse_args(argv: Optional[list[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", help="a YAML recipe file (see recipes/)")
    ap.add_argument("--validate-only", action="store_true",
                    help="load the newest checkpoint of train.output_dir (any TP/PP layout), print validation losses")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2 train.steps=100")
    add_tracking_args(ap)
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:  # every config error is reported before any process group starts
        cfg = load_config(args.config, args.overrides, world_size=runtime.world_size_from_env())
        if not cfg.data.path:
            raise ConfigError("data.path is required: a data_prep/build_c4.py output directory")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    runtime.init_distributed(cfg)
    t = cfg.train
    try:
        tokenizer = load_tokenizer(cfg)
        check_start(cfg, tokenizer)  # before the datasets write their index cache into train.output_dir
        eval_on = (t.eval_interval > 0 or args.validate_only) and t.eval_steps > 0
        train_ds, valid_ds = build_pretrain_datasets(
            cfg, tokenizer, train_samples=t.steps * t.global_batch_size,
            valid_samples=(t.eval_steps * t.global_batch_size) if eval_on else 0,
            cache_dir=os.path.join(t.output_dir, "data_cache"))
    except (DataError, TokenizerMismatch, ResumeRefused, checkpoint.ModelMismatch, FileNotFoundError) as exc:
        if torch.distributed.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr)
        runtime.destroy()
        return 2
    return run_job(cfg, tokenizer=tokenizer, train_ds=train_ds, valid_ds=valid_ds, stage="pretrain",
                   tags={"variant": cfg.data.variant, "preset": cfg.model.preset, **tags_from(args)},
                   artifacts=(os.path.join(cfg.data.path, MANIFEST),), validate_only=args.validate_only,
                   parent_run_id=args.parent_run_id)


if __name__ == "__main__":
    sys.exit(main())
