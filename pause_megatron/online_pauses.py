"""PausePT without pause shards: the std shards with the pause rule applied to each window as it is read.

Data prep writes every window of `seq_length` tokens as one document of a std shard and, through
`inject_pauses` seeded by `window_rng(seed, shard index, window index)`, as one document of the pause shard.
megatron-core's GPTDataset then concatenates documents into samples of `seq_length + 1` tokens. Injecting per
*document*, below GPTDataset, is what reproduces the pause shards: the same rule, the same generator per window,
and the same document lengths for GPTDataset to build its indices from (the pause count depends on a window's
length only, so the lengths are known from the std index without reading a token). Per-sample injection,
above GPTDataset, would cut different windows and could not match. A window's pauses depend on (data-prep
seed, shard index, window index) only: the same on every rank, resume and parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from pause_megatron.data import DataError
from pause_megatron.pauses import inject_pauses, paused_lengths, window_rng


class PausedDocuments:
    """A std shard (megatron-core IndexedDataset) whose documents read as PausePT windows.

    Offers what GPTDataset uses of its low-level dataset: `sequence_lengths` (int32, the injected lengths),
    `get(idx, offset, length)`, `path_prefix` and len().
    """

    def __init__(self, documents, *, shard_index: int, seed: int, ratio: float, pause_id: int, seq_length: int):
        self.documents = documents
        self.path_prefix = documents.path_prefix
        self.shard_index, self.seed, self.ratio = shard_index, seed, ratio
        self.pause_id, self.seq_length = pause_id, seq_length
        self.sequence_lengths = paused_lengths(documents.sequence_lengths, seq_length=seq_length, ratio=ratio)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def window(self, idx: int) -> np.ndarray:
        """Window `idx` of the shard with its pauses: the pause shard's document `idx`."""
        rng = window_rng(seed=self.seed, shard_index=self.shard_index, window_index=int(idx))
        window = inject_pauses(self.documents.get(int(idx)), pause_id=self.pause_id, seq_length=self.seq_length,
                               rng=rng, ratio=self.ratio)
        # GPTDataset cut its samples by sequence_lengths; a window of another length would shift every later
        # sample (or be padded silently at the end of an epoch) instead of failing.
        if len(window) != self.sequence_lengths[idx]:
            raise DataError(f"{self.path_prefix}: window {idx} has {len(window)} tokens with its pauses but its "
                             f"paused length is {self.sequence_lengths[idx]} (pauses.ratio={self.ratio})")
        return window

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        end = None if length is None else offset + length
        return self.window(idx)[offset:end]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.window(idx)


@dataclass
class PausedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the pause rule's settings; part of the dataset's cache key."""

    pause_id: int = -1
    pause_ratio: float = 0.0
    pause_seed: int = 0
    shard_indices: dict = field(default_factory=dict)  # std shard prefix -> its data-prep shard index


class PausedGPTDataset(GPTDataset):
    """megatron-core's GPTDataset over std shards read through PausedDocuments."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: PausedGPTDatasetConfig) -> PausedDocuments:
        return PausedDocuments(GPTDataset.build_low_level_dataset(dataset_path, config),
                               shard_index=config.shard_indices[dataset_path], seed=config.pause_seed,
                               ratio=config.pause_ratio, pause_id=config.pause_id, seq_length=config.sequence_length)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "pause_id", "pause_ratio", "pause_seed"]
