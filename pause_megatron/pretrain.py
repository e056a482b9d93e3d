"""Pretraining entry point: `python -m pause_megatron.pretrain --config recipes/pretrain_130m_pause.yaml k=v ...`.

Started by torchrun (one process per GPU) or by srun (one task per GPU); see slurm/. Resumes from the newest
checkpoint in `train.output_dir` if there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from pause_megatron import checkpoint, runtime
from pause_megatron.config import ConfigError, flat_dict, load_config, to_dict
from pause_megatron.data import (
    MANIFEST,
    DataError,
    build_pretrain_datasets,
    load_tokenizer,
    microbatches_from,
)
from pause_megatron.tokenizer import TokenizerMismatch, padded_vocab_size
from pause_megatron.tracking import Tracker
from pause_megatron.train import build_train_state, fit, validate

RUN_FILE = "run.json"  # the MLflow run id, so that a restarted job logs into the same run


def parse_args(argv: Optional[list[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", help="a YAML recipe file (see recipes/)")
    ap.add_argument("--validate-only", action="store_true",
                    help="load the newest checkpoint of train.output_dir (any TP/PP layout), print validation losses")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2 train.steps=100")
    return ap.parse_args(argv)


def _run_record(output_dir: str) -> dict:
    path = os.path.join(output_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


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
    from megatron.core import parallel_state as ps

    rank0 = torch.distributed.get_rank() == 0
    cuda = runtime.use_cuda()
    t = cfg.train
    try:
        tokenizer = load_tokenizer(cfg)
        vocab = padded_vocab_size(tokenizer.vocab_size, tensor_parallel=cfg.parallel.tensor,
                                  divisible_by=cfg.model.make_vocab_size_divisible_by)
        if rank0:
            os.makedirs(t.output_dir, exist_ok=True)
        torch.distributed.barrier()
        eval_on = (t.eval_interval > 0 or args.validate_only) and t.eval_steps > 0
        train_ds, valid_ds = build_pretrain_datasets(
            cfg, tokenizer, train_samples=t.steps * t.global_batch_size,
            valid_samples=(t.eval_steps * t.global_batch_size) if eval_on else 0,
            cache_dir=os.path.join(t.output_dir, "data_cache"))
    except (DataError, TokenizerMismatch, FileNotFoundError) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        runtime.destroy()
        return 2

    state = build_train_state(cfg, vocab_size=vocab, cuda=cuda)
    ckpt_root = os.path.join(t.output_dir, "checkpoints")
    resume_from = checkpoint.latest_checkpoint(ckpt_root)
    if resume_from:
        checkpoint.load(state, resume_from)
        if rank0:
            print(f"resumed from {resume_from} at step {state.step}", flush=True)
    elif t.init_from:
        checkpoint.load(state, t.init_from, weights_only=True)

    if args.validate_only:
        if not resume_from:
            raise SystemExit(f"error: no checkpoint in {ckpt_root}")
        losses = validate(state, lambda start: microbatches_from(
            valid_ds, start=start, cfg=cfg, pause_id=tokenizer.pause_id, dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size()))
        if rank0:
            print(json.dumps({"step": state.step, **losses}), flush=True)
        runtime.destroy()
        return 0

    tracker = Tracker(cfg.tracking, enabled=rank0)
    record = _run_record(t.output_dir) if rank0 else {}
    run_id = tracker.start(
        params=flat_dict(cfg),
        tags={"stage": "pretrain", "variant": cfg.data.variant, "preset": cfg.model.preset},
        resume_run_id=record.get("mlflow_run_id"),
    )
    holder = [run_id]
    torch.distributed.broadcast_object_list(holder, src=0)  # checkpoints must agree on every rank
    run_id = holder[0]
    if rank0:
        with open(os.path.join(t.output_dir, RUN_FILE), "w") as f:
            json.dump({"mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri}, f)
        with open(os.path.join(t.output_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        tracker.log_artifact(os.path.join(t.output_dir, "config.json"))
        tracker.log_artifact(os.path.join(cfg.data.path, MANIFEST))
        params = sum(p.numel() for chunk in state.model for p in chunk.parameters())
        print(f"pretraining {cfg.model.preset} ({cfg.data.variant}) on {torch.distributed.get_world_size()} ranks: "
              f"TP={cfg.parallel.tensor} PP={cfg.parallel.pipeline} DP={ps.get_data_parallel_world_size()}, "
              f"{params / 1e6:.1f}M parameters on rank 0, {t.steps} steps", flush=True)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

    def train_batches(start: int) -> list[dict]:
        return microbatches_from(train_ds, start=start, cfg=cfg, pause_id=tokenizer.pause_id,
                                 dp_rank=dp_rank, dp_size=dp_size)

    def valid_batches(start: int) -> list[dict]:
        return microbatches_from(valid_ds, start=start, cfg=cfg, pause_id=tokenizer.pause_id,
                                 dp_rank=dp_rank, dp_size=dp_size)

    extra = {"config": to_dict(cfg), "mlflow_run_id": run_id, **tokenizer.ids(),
             "tokenizer_sha256": tokenizer.checksum}
    status = "FAILED"
    try:
        result = fit(state, train_batches=train_batches, valid_batches=valid_batches if valid_ds else None,
                     tracker=tracker, vocab_size=vocab, checkpoint_extra=extra)
        status = "KILLED" if result["stopped"] else "FINISHED"
        if rank0:
            print(json.dumps({"final_step": result["step"], **result["last"]}), flush=True)
    finally:
        tracker.end(status)
        runtime.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
