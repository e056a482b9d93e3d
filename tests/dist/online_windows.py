"""The pretraining samples of several data settings, as digests: what the online/offline pause tests compare.

    torchrun --nproc-per-node=1 tests/dist/online_windows.py CACHE_DIR SPEC [SPEC ...]

SPEC is DATA_DIR,variant,source,ratio (e.g. out,pause,online,0.2). For each, the train and validation
GPTDatasets are built as pretraining builds them (pause_megatron.data.build_pretrain_datasets, at a train.seed
unlike any data-prep seed), every sample is read, and one JSON object per SPEC is printed: the sha256 of each
sample's tokens + last label, the number of pause ids read, the blend weights across shards and, for online
specs, whether each low-level window equals the pause shard's document (when the data dir's pause shards were
made at that ratio) and the error a window of another length than its paused length raises.
"""

import copy
import hashlib
import json
import os
import sys

import numpy as np

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.data import DataError, build_pretrain_datasets, load_tokenizer

TRAIN, VALID = 40, 8
TRAIN_SEED = 7  # not data prep's seed: the pauses must be seeded by the manifest's


def digests(dataset) -> list[str]:
    out = []
    for i in range(len(dataset)):
        s = dataset[i]
        row = np.concatenate([np.asarray(s["tokens"]), np.asarray(s["labels"])[-1:]]).astype(np.int64)
        out.append(hashlib.sha256(row.tobytes()).hexdigest()[:16])
    return out


def main():
    cache, specs = sys.argv[1], sys.argv[2:]
    results = {}
    runtime.init_distributed(load_config(None, []))  # megatron-core's dataset builder asks the process group
    for n, spec in enumerate(specs):
        data, variant, source, ratio = spec.split(",")
        cfg = load_config(None, ["model.preset=tiny", f"data.path={data}", f"data.variant={variant}",
                                 f"pauses.source={source}", f"pauses.ratio={ratio}", "data.split=80,20,0",
                                 f"train.seed={TRAIN_SEED}"])
        tok = load_tokenizer(cfg)
        train, valid = build_pretrain_datasets(cfg, tok, train_samples=TRAIN, valid_samples=VALID,
                                               cache_dir=os.path.join(cache, str(n)))
        pauses = sum(int((np.asarray(d[i]["tokens"]) == tok.pause_id).sum()) for d in (train, valid)
                     for i in range(len(d)))
        result = {"train": digests(train), "valid": digests(valid), "pauses": pauses,
                  "weights": [list(map(float, d.weights)) for d in (train, valid)]}
        if source == "online":
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            same = []
            for shard in train.datasets:  # BlendedDataset over one GPTDataset per shard
                documents = shard.dataset
                name = os.path.basename(documents.path_prefix)
                offline = IndexedDataset(os.path.join(os.path.dirname(os.path.dirname(documents.path_prefix)),
                                                      "pause", name))
                same.append(all(np.array_equal(documents.get(i), offline.get(i)) for i in range(len(documents))))
                same.append(bool(np.array_equal(documents.sequence_lengths, offline.sequence_lengths)))
            result["windows_equal_pause_shards"] = all(same)
            bad = copy.copy(train.datasets[0].dataset)  # lengths that are not those of its windows
            bad.sequence_lengths = bad.sequence_lengths - 1
            try:
                bad.get(0)
                result["length_mismatch_error"] = None
            except DataError as exc:
                result["length_mismatch_error"] = str(exc)
        results[spec] = result
    print(json.dumps(results))
    runtime.destroy()


if __name__ == "__main__":
    main()
