"""Per-task pause finetuning: `python -m pause_megatron.finetune --config recipes/finetune.yaml task=squad
pauses.m_ft=10 train.init_from=runs/pretrain_1b_pause/checkpoints [data.task_dir=DIR]`.

Starts from a pretraining checkpoint (any TP/PP layout; the tokenizer comes with it), builds examples as
prompt + M_ft pauses + target with the pause rule's placement (append, prepend, none, filler), puts the loss
on the target tokens only, and trains with the same loop, parallelism, checkpoints and MLflow logging as
pretraining. A standard model finetuned with pauses (StdPT_PauseFT) trains the `<pause>` embedding it never
used in pretraining: the id is in every tokenizer, so nothing special is needed.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below: a stop signal during start-up is kept, not fatal
    from pause_megatron import stop_signals

    stop_signals.catch()

import argparse
import sys
from typing import Optional

import torch

from pause_megatron import checkpoint, runtime
from pause_megatron.config import ConfigError, load_config
from pause_megatron.data import DataError, FinetuneDataset
from pause_megatron.job import add_tracking_args, run_job, tags_from
from pause_megatron.tasks import TaskDataError, UnknownTask, get_task, load_examples, warn_if_overlapping
from pause_megatron import tokenizer as tokenizers
from pause_megatron.tokenizer import BaseTokenizer, TokenizerMismatch


def finetune_config(config_path: Optional[str], overrides: list[str]):
    """The recipe and overrides on top of the pretrained model's shape (its `model` section)."""
    probe = load_config(config_path, overrides)  # validates the overrides and finds train.init_from
    if not probe.train.init_from:
        raise ConfigError("train.init_from is required: the pretraining checkpoint to finetune")
    if not probe.task:
        raise ConfigError("task is required, e.g. task=squad")
    try:
        pretrained = checkpoint.read_extra(probe.train.init_from).get("config", {})
    except FileNotFoundError as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    return load_config(config_path, overrides, base={"model": pretrained.get("model", {})},
                       world_size=runtime.world_size_from_env())


def build_datasets(cfg, tokenizer: BaseTokenizer):
    """(train, eval) FinetuneDatasets of cfg.task with M_ft pauses placed as cfg.pauses says."""
    task = get_task(cfg.task)
    p = cfg.pauses
    m = 0 if p.placement == "none" else p.m_ft
    filler_id = tokenizer.piece_id(p.filler) if p.placement == "filler" else None
    out, pairs_of = [], {}
    for part in ("train", "eval"):
        pairs = pairs_of[part] = load_examples(task, part=part, data_dir=cfg.data.task_dir)
        out.append(FinetuneDataset(pairs, tokenizer=tokenizer, seq_length=cfg.model.seq_length, m=m,
                                   placement=p.placement, filler_id=filler_id, seed=cfg.train.seed,
                                   where=f"{task.name}/{part}"))
    if runtime.dist_env().rank == 0:
        warn_if_overlapping(task, pairs_of["train"], pairs_of["eval"], where=cfg.data.task_dir or task.hf_path)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a YAML recipe file")
    ap.add_argument("overrides", nargs="*", help="dotted overrides: task=squad pauses.m_ft=10 ...")
    add_tracking_args(ap)
    args = ap.parse_args(argv)
    try:
        cfg = finetune_config(args.config, args.overrides)
        tokenizer = tokenizers.load(checkpoint.tokenizer_path(cfg.train.init_from))
        if cfg.pauses.placement in ("append", "prepend") and cfg.pauses.m_ft > 0:
            tokenizer.require_pause(why=f"pauses.placement={cfg.pauses.placement} asks for pauses")
        tokenizer.check_matches(checkpoint.read_extra(cfg.train.init_from), where=cfg.train.init_from)
        train_ds, eval_ds = build_datasets(cfg, tokenizer)
    except (ConfigError, UnknownTask, DataError, TaskDataError, TokenizerMismatch, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, UnknownTask) else exc}", file=sys.stderr)
        return 2
    runtime.init_distributed(cfg)
    p = cfg.pauses
    return run_job(cfg, tokenizer=tokenizer, train_ds=train_ds, valid_ds=eval_ds, stage="finetune",
                   tags={"task": cfg.task, "m_ft": str(p.m_ft), "placement": p.placement,
                         "seed": str(cfg.train.seed), **tags_from(args)}, parent_run_id=args.parent_run_id)


if __name__ == "__main__":
    sys.exit(main())
