"""Pretraining data: Megatron-Core's GPTDataset over data-prep shards, batched with the pause loss mask.

Data prep (data_prep/build_c4.py) writes each window of `seq_length` tokens as one document of a Megatron
indexed dataset; megatron-core's stock GPTDataset (built by BlendedMegatronDatasetBuilder, with the train /
validation split and blending across shards) then yields samples of `seq_length + 1` tokens aligned to the
windows. The pause rule's loss mask is applied on top of GPTDataset's own mask when samples are batched.
With pauses.source=online, PausePT reads the std shards and injects the pauses per window as it is read
(pause_megatron.online_pauses): the same windows as the pause shards, at any pauses.ratio.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from pause_megatron.config import Config
from pause_megatron.pauses import pause_loss_mask, paused_lengths
from pause_megatron import tokenizer as tokenizers
from pause_megatron.tokenizer import BaseTokenizer

MANIFEST = "manifest.json"


class DataError(ValueError):
    """The data directory does not fit the config or the tokenizer; the message names the file."""


@dataclass(frozen=True)
class _TokenizerView:
    """What GPTDataset reads from a tokenizer (its ids only: the shards are already tokenized)."""

    eod: int
    pad: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset cache key
        return {"class": "PauseTokenizer", "eod": self.eod, "pad": self.pad, "vocab_size": self.vocab_size}


def read_manifest(data_path: str) -> dict:
    path = os.path.join(data_path, MANIFEST)
    if not os.path.exists(path):
        raise DataError(f"{path} not found: data.path must be an output directory of data_prep/build_c4.py")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def load_tokenizer(cfg: Config) -> BaseTokenizer:
    """data.tokenizer, or the tokenizer (either kind) that data prep wrote next to the manifest."""
    return tokenizers.load(cfg.data.tokenizer or cfg.data.path or ".")


def shard_prefixes(data_path: str, variant: str) -> list[str]:
    """Indexed-dataset prefixes (path without .bin/.idx) of one variant, in name order."""
    folder = os.path.join(data_path, variant)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} not found: no '{variant}' shards in {data_path}")
    prefixes = sorted(os.path.join(folder, n[:-4]) for n in os.listdir(folder) if n.endswith(".idx"))
    missing = [p for p in prefixes if not os.path.exists(p + ".bin")]
    if not prefixes or missing:
        raise DataError(f"{folder}: no complete shards (.bin + .idx)" + (f"; missing {missing[0]}.bin" if missing else ""))
    return prefixes


def check_manifest(manifest: dict, *, cfg: Config, tokenizer: BaseTokenizer, where: str) -> None:
    """The shards must be complete and made with this tokenizer and this sequence length."""
    if manifest.get("complete") is False:
        raise DataError(f"{where}: data prep has not finished every shard (complete: false); run it again to finish")
    tokenizer.check_matches(manifest, where=where)
    seq = manifest.get("seq_length")
    if seq is not None and seq != cfg.model.seq_length:
        raise DataError(f"{where}: shards have seq_length={seq} but model.seq_length={cfg.model.seq_length}")
    ratio = manifest.get("pause_ratio")
    if reads_online(cfg):
        if manifest.get("seed") is None or seq is None:
            raise DataError(f"{where}: pauses.source=online needs the data-prep seed and seq_length of the manifest")
    elif cfg.data.variant == "pause" and ratio is not None and abs(ratio - cfg.pauses.ratio) > 1e-9:
        raise DataError(f"{where}: the pause shards were made with pause_ratio={ratio} but pauses.ratio="
                        f"{cfg.pauses.ratio}; set pauses.ratio={ratio}, rebuild the data with --pause-ratio, or "
                        "inject the pauses as the std shards are read (pauses.source=online)")


def reads_online(cfg: Config) -> bool:
    """Whether PausePT injects its pauses as the std shards are read (pauses.source=online; the config refuses
    it with data.variant=std)."""
    return cfg.pauses.source == "online"


def shard_indices(manifest: dict, prefixes: Sequence[str], *, data_path: str, where: str) -> dict[str, int]:
    """Each std shard prefix's data-prep shard index (it seeds the shard's pauses), from the manifest."""
    by_prefix = {os.path.join(data_path, r["std"]): r["shard_index"]
                 for r in manifest.get("shards", []) if r.get("std")}
    missing = [p for p in prefixes if p not in by_prefix]
    if missing:
        raise DataError(f"{where}: no shard record for {missing[0]}: the manifest does not match the shards")
    return {p: by_prefix[p] for p in prefixes}


def open_shard(prefix: str):
    """megatron-core's IndexedDataset of `prefix` (.idx + .bin), or a DataError naming the file and the remedy.

    A truncated or damaged index otherwise ends in a bare struct.error or AssertionError inside megatron-core,
    and a truncated .bin only when a window past its end is read, mid-training.
    """
    import struct

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data_dir = os.path.dirname(os.path.dirname(prefix)) or "."
    remedy = (f"the shard is truncated or damaged: `python -m data_prep.build_c4 validate {data_dir}` lists every "
              f"damaged shard, and rerunning the same `python -m data_prep.build_c4 build ... --output {data_dir}` "
              "command rebuilds exactly those (the whole ones are skipped)")
    # A half-built IndexedDataset (or its .bin reader) fails again in its __del__ (a missing attribute): that
    # second traceback says nothing more, so it is dropped while the first failure is turned into the DataError.
    def quiet(unraisable, default=sys.unraisablehook):
        half_built = ("IndexedDataset" in repr(unraisable.object) or "_MMapBinReader" in repr(unraisable.object))
        if not (isinstance(unraisable.exc_value, AttributeError) and half_built):
            default(unraisable)

    error, sys.unraisablehook = None, quiet
    try:
        try:
            dataset = IndexedDataset(prefix)
        except (struct.error, AssertionError, ValueError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        sys.unraisablehook = quiet.__defaults__[0]
    bin_path = prefix + ".bin"
    if error and not os.path.exists(bin_path):
        raise DataError(f"{bin_path}: missing; {remedy}")
    if error and os.path.getsize(bin_path) == 0:  # megatron-core cannot map an empty file
        raise DataError(f"{bin_path}: empty (0 bytes); {remedy}")
    if error:
        raise DataError(f"{prefix}.idx: cannot read the index ({error}); {remedy}")
    need = int(dataset.index.sequence_pointers[-1]) + int(dataset.index.sequence_lengths[-1]) * \
        np.dtype(dataset.index.dtype).itemsize if len(dataset.index.sequence_lengths) else 0
    have = os.path.getsize(bin_path)
    if have < need:
        raise DataError(f"{bin_path}: {have} bytes, but its index needs {need}; {remedy}")
    return dataset


def shard_sizes(prefixes: Sequence[str], *, pause_ratio: Optional[float] = None,
                seq_length: Optional[int] = None) -> list[tuple[int, int]]:
    """(windows, tokens) of each shard, read from its index (megatron-core's own reader).

    With `pause_ratio`: the tokens its windows hold once pauses are injected at that ratio (online PausePT).
    """
    sizes = []
    for prefix in prefixes:
        index = open_shard(prefix)  # held while its lengths are read: deleting it unmaps them
        lengths = index.sequence_lengths
        if pause_ratio is not None:
            lengths = paused_lengths(lengths, seq_length=seq_length, ratio=pause_ratio)
        sizes.append((len(lengths), int(lengths.sum())))
    return sizes


def _check_split_parts(prefixes, sizes, split_matrix, needed: dict[int, int], split: str) -> None:
    """Every shard must hold windows in each part of data.split that megatron-core builds.

    megatron-core gives split part i of a shard of n windows the windows [round(lo·n), round(hi·n)) and builds
    every part with a share, needed by the run or not; with explicit weights it looks for its share of samples
    (at least one token, even when none is asked for) in an empty part forever.
    """
    names = {0: "train", 1: "validation", 2: "test"}
    for i, bounds in enumerate(split_matrix):
        if bounds is None:
            continue
        lo, hi = bounds
        need = needed.get(i, 0)
        for prefix, (windows, _) in zip(prefixes, sizes):
            if int(round(hi * windows)) - int(round(lo * windows)) == 0:
                wanted = f"the run needs {need} {names[i]} samples" if need else "megatron-core builds it all the same"
                raise DataError(f"{prefix}: its {names[i]} part of data.split={split} is empty ({windows} windows in "
                                f"the shard) and {wanted}; give that part a larger share"
                                + (", or a share of 0 (no validation: train.eval_interval=0)" if i == 1 else "")
                                + (", or a share of 0" if i == 2 else ""))


def build_pretrain_datasets(cfg: Config, tokenizer: BaseTokenizer, *, train_samples: int, valid_samples: int,
                            cache_dir: str):
    """(train, validation) GPTDatasets over the shards of `cfg.data.variant`, blended by shard size.

    The blend has explicit weights (each shard's share of the tokens): megatron-core then builds each shard's
    dataset to its share of the samples asked for, over as many epochs as that takes. Without weights it
    would build one epoch per shard and silently serve min(asked, one epoch). A split that still cannot serve
    what the run asks for (an empty split, or an empty part of a shard) is refused here, before training starts.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    manifest = read_manifest(cfg.data.path)
    where = os.path.join(cfg.data.path, MANIFEST)
    check_manifest(manifest, cfg=cfg, tokenizer=tokenizer, where=where)
    online = reads_online(cfg)
    prefixes = shard_prefixes(cfg.data.path, "std" if online else cfg.data.variant)
    dataset_class, config_class, pause_settings = GPTDataset, GPTDatasetConfig, {}
    if online:  # the pause shards' windows at pauses.ratio: their lengths, blend weights and indices too
        from pause_megatron.online_pauses import PausedGPTDataset, PausedGPTDatasetConfig

        dataset_class, config_class = PausedGPTDataset, PausedGPTDatasetConfig
        pause_settings = dict(pause_id=tokenizer.pause_id, pause_ratio=cfg.pauses.ratio, pause_seed=manifest["seed"],
                              shard_indices=shard_indices(manifest, prefixes, data_path=cfg.data.path, where=where))
    sizes = shard_sizes(prefixes, **(dict(pause_ratio=cfg.pauses.ratio, seq_length=cfg.model.seq_length)
                                     if online else {}))
    total_tokens = sum(tokens for _, tokens in sizes)
    config = config_class(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, [tokens / total_tokens for _, tokens in sizes]),
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=_TokenizerView(eod=tokenizer.eod_id, pad=tokenizer.pad_id, vocab_size=tokenizer.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal mask comes from the layer spec
        **pause_settings,
    )
    _check_split_parts(prefixes, sizes, config.split_matrix, {0: train_samples, 1: valid_samples}, cfg.data.split)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    for name, dataset, needed in (("train", train, train_samples), ("validation", valid, valid_samples)):
        served = 0 if dataset is None else len(dataset)
        if served < needed:
            raise DataError(f"{os.path.dirname(prefixes[0])}: the {name} split (data.split={cfg.data.split}) "
                            f"serves {served} samples but the run needs {needed}")
    return train, valid


def collate(samples: Sequence[dict], *, pause_id: int) -> dict:
    """Stack samples into a microbatch. `loss_mask` gets the pause rule; `all_mask` keeps every target."""
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask",
                                                                               "position_ids")}
    batch["tokens"], batch["labels"] = batch["tokens"].long(), batch["labels"].long()
    all_mask = batch["loss_mask"].float()
    batch["all_mask"] = all_mask
    batch["loss_mask"] = all_mask * pause_loss_mask(batch["labels"], pause_id=pause_id)
    return batch


def microbatch_indices(*, start: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[list[int]]:
    """Sample indices of this data-parallel rank's microbatches for the global batch at `start`.

    In each group of dp_size microbatches, rank r takes the r-th (as Megatron's pretraining sampler does),
    so a step's samples depend only on `start` (consumed samples): resuming is exact.
    """
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise ValueError(f"global batch {global_batch_size} is not divisible by micro_batch_size x dp = {step}")
    out = []
    for group in range(start, start + global_batch_size, step):
        lo = group + dp_rank * micro_batch_size
        out.append(list(range(lo, lo + micro_batch_size)))
    return out


PAD_MULTIPLE = 8  # variable-length microbatches are padded to a multiple of this (x TP: sequence parallel splits it)
# FP8 GEMMs need their token dimension aligned: 16, or 32 for MXFP8 (Transformer Engine's rule, as Megatron-Core's
# fp8_utils.get_fp8_align_size states it; kept here so that the rule is readable without importing Megatron).
FP8_ALIGN = {"mxfp8": 32}
FP8_ALIGN_DEFAULT = 16


def padded_width(longest: int, cfg: Config) -> int:
    """The width of a microbatch whose longest sample has `longest` positions: rounded up to a multiple of
    PAD_MULTIPLE (with FP8: its alignment) x TP, at most seq_length (which pretraining already runs at)."""
    multiple = PAD_MULTIPLE
    if cfg.precision.fp8 is not None:
        multiple = FP8_ALIGN.get(cfg.precision.fp8_recipe, FP8_ALIGN_DEFAULT)
    multiple *= cfg.parallel.tensor
    return max(longest, min(-(-longest // multiple) * multiple, cfg.model.seq_length))


def pad_samples(samples: Sequence[dict], *, length: int, pad_id: Optional[int]) -> list[dict]:
    """Samples right-padded to `length` positions: pad ids, zero loss weight, positions continued.

    Right padding changes no real position's output (the attention is causal) and adds nothing to the loss.
    """
    out = []
    for s in samples:
        pad = length - len(s["tokens"])
        if pad == 0:
            out.append(s)
            continue
        if pad_id is None:
            raise ValueError("samples of different lengths need a dataset with a pad_id")
        fill = torch.full((pad,), pad_id, dtype=torch.long)
        out.append({"tokens": torch.cat([torch.as_tensor(s["tokens"]).long(), fill]),
                    "labels": torch.cat([torch.as_tensor(s["labels"]).long(), fill]),
                    "loss_mask": torch.cat([torch.as_tensor(s["loss_mask"]).float(), torch.zeros(pad)]),
                    "position_ids": torch.arange(length)})
    return out


def microbatches_from(dataset, *, start: int, cfg: Config, pause_id: int, dp_rank: int, dp_size: int,
                      global_batch_size: Optional[int] = None) -> list[dict]:
    """This rank's microbatches of the global batch at sample `start` of a dataset.

    Samples shorter than `seq_length` (finetuning examples) are padded to the longest of their microbatch,
    rounded up (`padded_width`); with pipeline parallelism to the longest of this
    rank's share of the global batch instead, since the pipeline's stages exchange activations of one shape
    for the whole step. Pretraining samples all have `seq_length` tokens: nothing changes for them.
    """
    groups = microbatch_indices(start=start, global_batch_size=global_batch_size or cfg.train.global_batch_size,
                                micro_batch_size=cfg.train.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    batches = [[dataset[i] for i in idx] for idx in groups]
    longest = [max(len(s["tokens"]) for s in b) for b in batches]
    if cfg.parallel.pipeline > 1:
        longest = [max(longest)] * len(longest)
    pad_id = getattr(dataset, "pad_id", None)
    return [collate(pad_samples(b, length=padded_width(n, cfg), pad_id=pad_id), pause_id=pause_id)
            for b, n in zip(batches, longest)]


def windows_to_samples(windows) -> list[dict]:
    """Token rows of `seq_length + 1` ids as GPTDataset-style samples (every target counted)."""
    windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    width = windows.shape[1] - 1
    return [
        {"tokens": w[:-1], "labels": w[1:], "loss_mask": torch.ones(width), "position_ids": torch.arange(width)}
        for w in windows
    ]


class FinetuneDataset:
    """PauseFT samples: prompt + M placed pauses + target + EOD, at most seq_length + 1 ids; loss on the target.

    A sample has as many positions as its example (no padding): `microbatches_from` pads each microbatch to its
    longest, so a short example does not cost a `seq_length` forward and backward.

    Prompt and target are split as evaluation splits them (`BaseTokenizer.encode_pair`).

    Index i is example perm_e[i mod N] of epoch e = i // N (a fresh seeded shuffle per epoch), so the order
    depends only on the seed and i, and training resumes exactly from `consumed_samples`.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], *, tokenizer: BaseTokenizer, seq_length: int, m: int,
                 placement: str, filler_id: Optional[int], seed: int, where: str):
        from pause_megatron.pauses import finetune_example

        if not pairs:
            raise DataError(f"{where}: no finetuning examples")
        self.seq_length, self.seed, self.pad_id = seq_length, seed, tokenizer.pad_id
        self.examples = []
        for i, (prompt, target) in enumerate(pairs):
            prompt_ids, target_ids = tokenizer.encode_pair(prompt, target)  # the ids evaluation scores
            try:
                ids, is_target = finetune_example(
                    prompt_ids, target_ids + [tokenizer.eod_id], m=m,
                    pause_id=tokenizer.pause_id, placement=placement, filler_id=filler_id, max_length=seq_length + 1)
            except ValueError as exc:
                raise DataError(f"{where}: example {i}: {exc}") from None
            self.examples.append((ids, is_target))

    def __len__(self) -> int:
        return len(self.examples)

    def _example(self, i: int) -> tuple[list[int], list[int]]:
        n = len(self.examples)
        perm = np.random.default_rng([self.seed, i // n]).permutation(n)
        return self.examples[perm[i % n]]

    def __getitem__(self, i: int) -> dict:
        ids, is_target = self._example(i)
        ids = torch.tensor(ids, dtype=torch.long)
        target = torch.tensor(is_target, dtype=torch.float32)
        return {"tokens": ids[:-1], "labels": ids[1:], "loss_mask": target[1:],
                "position_ids": torch.arange(len(ids) - 1)}
