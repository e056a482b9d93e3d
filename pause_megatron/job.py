"""What pretraining and finetuning jobs share around the loop: output directory, resume, MLflow, checkpoints.

`run_job(cfg, tokenizer, train_ds, valid_ds, ...)` builds the train state, resumes from the newest checkpoint
of `train.output_dir` (or starts from `train.init_from`'s weights), starts or resumes the MLflow run, and runs
`train.fit`. The datasets are anything indexable that yields GPTDataset-style samples.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Optional

import torch

from pause_megatron import checkpoint, runtime
from pause_megatron.config import Config, flat_dict, to_dict
from pause_megatron.data import microbatches_from
from pause_megatron.model import kernel_summary
from pause_megatron.tokenizer import PauseTokenizer, TokenizerMismatch, padded_vocab_size
from pause_megatron.tracking import Tracker
from pause_megatron.train import build_train_state, fit, validate

RUN_FILE = "run.json"  # the MLflow run id, so that a restarted job logs into the same run
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to resume (slurm/ requeues on it)


def add_tracking_args(parser) -> None:
    """--parent-run-id and --tag: how the recipe runner nests a stage's MLflow run and labels it."""
    parser.add_argument("--parent-run-id", help="MLflow run to nest this run under (the recipe runner sets it)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="an MLflow tag for this run (repeatable), e.g. --tag variant=PausePT_PauseFT")


def tags_from(args) -> dict[str, str]:
    bad = [t for t in args.tag if "=" not in t]
    if bad:
        raise SystemExit(f"error: --tag {bad[0]!r} is not KEY=VALUE")
    return dict(t.split("=", 1) for t in args.tag)


def vocab_size(cfg: Config, tokenizer: PauseTokenizer) -> int:
    return padded_vocab_size(tokenizer.vocab_size, tensor_parallel=cfg.parallel.tensor,
                             divisible_by=cfg.model.make_vocab_size_divisible_by)


def prepare_output_dir(cfg: Config, tokenizer: PauseTokenizer) -> str:
    """Create train.output_dir/checkpoints with the tokenizer in it (checkpoints are self-contained).

    A tokenizer already there is the one the checkpoints were made with: it is never rewritten (the caller
    has checked that it matches).
    """
    root = os.path.join(cfg.train.output_dir, "checkpoints")
    path = os.path.join(root, checkpoint.TOKENIZER_FILE)
    if torch.distributed.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        if not os.path.exists(path):
            tokenizer.save(path)
    torch.distributed.barrier()
    return root


class ResumeRefused(ValueError):
    """The checkpoint in train.output_dir cannot be continued with this config."""


# What may differ between a checkpoint's config and the run that resumes it. train.steps: more (or fewer, but
# not below the checkpoint's step); the remaining steps follow the cosine schedule for the new total. The
# rest changes where and how often things are logged or saved, or the parallel layout (checkpoints reshard).
RESUMABLE_PREFIXES = ("tracking.", "parallel.")
RESUMABLE_KEYS = {"train.steps", "train.log_interval", "train.eval_interval", "train.eval_steps",
                  "train.save_interval", "train.keep_checkpoints", "train.output_dir", "train.init_from"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_refusal(saved: dict, new: dict, *, step: int) -> list[str]:
    """Why a run with config `new` must not continue a checkpoint at `step` made with `saved` (empty: it may)."""
    old_flat, new_flat = _flat(saved), _flat(new)
    reasons = []
    for key in sorted(set(old_flat) & set(new_flat)):  # a field added or removed since the save: nothing to compare
        before, after = old_flat[key], new_flat[key]
        if key == "train.steps":
            if after < step:
                reasons.append(f"train.steps: {before!r} -> {after!r} (the checkpoint is at step {step})")
        elif before != after and key not in RESUMABLE_KEYS and not key.startswith(RESUMABLE_PREFIXES):
            reasons.append(f"{key}: {before!r} -> {after!r}")
    return reasons


def check_resume(cfg: Config, tokenizer: PauseTokenizer, resume_from: str) -> None:
    """Raise ResumeRefused naming every unsafe difference between the checkpoint and this run, or
    TokenizerMismatch when this run's tokenizer is not the checkpoint's."""
    extra = checkpoint.read_extra(resume_from)
    tokenizer.check_matches(extra, where=resume_from)
    saved = extra.get("config")
    if saved is None:
        return
    step = int(os.path.basename(resume_from).split("_")[-1])
    reasons = resume_refusal(saved, to_dict(cfg), step=step)
    if reasons:
        raise ResumeRefused(
            f"{resume_from} was made with another configuration: " + "; ".join(reasons) + ". Only more steps (and "
            "logging, saving and parallel layout settings) may change on resume: use a new train.output_dir, or "
            "the checkpoint's settings")


def _read_run_id(output_dir: str, uri: str) -> Optional[str]:
    """The MLflow run of an earlier start of this job, if it was tracked in the same store (another store has
    no such run: the resumed job then starts a new one there)."""
    path = os.path.join(output_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record.get("tracking_uri") == uri:
            return record.get("mlflow_run_id")
    return None


def run_job(cfg: Config, *, tokenizer: PauseTokenizer, train_ds, valid_ds, stage: str, tags: dict[str, str],
            artifacts: tuple[str, ...] = (), validate_only: bool = False,
            parent_run_id: Optional[str] = None) -> int:
    """Train (or, with validate_only, evaluate the newest checkpoint) and tear the process group down."""
    from megatron.core import parallel_state as ps

    t = cfg.train
    rank0 = torch.distributed.get_rank() == 0
    vocab = vocab_size(cfg, tokenizer)
    resume_from = checkpoint.latest_checkpoint(os.path.join(t.output_dir, "checkpoints"))
    try:  # before anything is written: a refused run leaves the output directory as it was
        if resume_from:
            check_resume(cfg, tokenizer, resume_from)
        elif t.init_from:
            checkpoint.check_init_from_model(t.init_from, cfg)
    except (ResumeRefused, TokenizerMismatch, checkpoint.ModelMismatch) as exc:
        if rank0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        runtime.destroy()
        return 2
    ckpt_root = prepare_output_dir(cfg, tokenizer)
    state = build_train_state(cfg, vocab_size=vocab, cuda=runtime.use_cuda())
    if resume_from:
        checkpoint.load(state, resume_from)
        # The schedule runs to this run's train.steps (the checkpoint holds the total it was saved with).
        state.scheduler.lr_decay_steps = t.steps
        state.scheduler.wd_incr_steps = t.steps
        if rank0:
            print(f"resumed from {resume_from} at step {state.step}", flush=True)
    elif t.init_from:
        tokenizer.check_matches(checkpoint.read_extra(t.init_from), where=t.init_from)
        checkpoint.load(state, t.init_from, weights_only=True)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    nodes = [None] * torch.distributed.get_world_size()  # where the ranks run: worth a line in every log
    torch.distributed.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME") or socket.gethostname())

    def batches(dataset):
        return lambda start: microbatches_from(dataset, start=start, cfg=cfg, pause_id=tokenizer.pause_id,
                                               dp_rank=dp_rank, dp_size=dp_size)

    if validate_only:
        if not resume_from:
            raise SystemExit(f"error: no checkpoint in {ckpt_root}")
        losses = validate(state, batches(valid_ds))
        if rank0:
            print(json.dumps({"step": state.step, **losses}), flush=True)
        runtime.destroy()
        return 0

    tracker = Tracker(cfg.tracking, enabled=rank0)
    run_id = tracker.start(params=flat_dict(cfg), tags={"stage": stage, **tags},
                           resume_run_id=_read_run_id(t.output_dir, cfg.tracking.uri) if rank0 else None,
                           parent_run_id=parent_run_id)
    holder = [run_id]
    torch.distributed.broadcast_object_list(holder, src=0)  # the checkpoint's common state must agree
    run_id = holder[0]
    if rank0:
        with open(os.path.join(t.output_dir, RUN_FILE), "w") as f:
            json.dump({"mlflow_run_id": run_id, "tracking_uri": cfg.tracking.uri}, f)
        with open(os.path.join(t.output_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        for path in (os.path.join(t.output_dir, "config.json"), *artifacts):
            tracker.log_artifact(path)
        params = sum(p.numel() for chunk in state.model for p in chunk.parameters())
        print(f"{stage}: {cfg.model.preset} on {torch.distributed.get_world_size()} ranks (TP={cfg.parallel.tensor} "
              f"PP={cfg.parallel.pipeline} DP={dp_size}), {params / 1e6:.2f}M parameters on rank 0, "
              f"{t.steps} steps", flush=True)
        print("ranks per node: " + ", ".join(f"{n}: {nodes.count(n)}" for n in dict.fromkeys(nodes)), flush=True)
        print(kernel_summary(cfg, cuda=state.cuda), flush=True)

    extra = {"config": to_dict(cfg), "mlflow_run_id": run_id, "stage": stage, **tokenizer.ids(),
             "tokenizer_sha256": tokenizer.checksum}
    status, code = "FAILED", 1
    try:
        result = fit(state, train_batches=batches(train_ds),
                     valid_batches=batches(valid_ds) if valid_ds is not None and len(valid_ds) else None,
                     tracker=tracker, vocab_size=vocab, checkpoint_extra=extra)
        status, code = ("KILLED", EXIT_STOPPED) if result["stopped"] else ("FINISHED", 0)
        if result["stopped"]:
            from pause_megatron.stop_signals import write_stop_file

            write_stop_file(str(result["step"]))
        if rank0:
            print(json.dumps({"final_step": result["step"], **result["last"]}), flush=True)
    finally:
        tracker.end(status)
        if rank0 and tracker.run_id != run_id:  # a slow server made the run after start(): resume into it next time
            with open(os.path.join(t.output_dir, RUN_FILE), "w") as f:
                json.dump({"mlflow_run_id": tracker.run_id, "tracking_uri": cfg.tracking.uri}, f)
        runtime.destroy()
    return code
