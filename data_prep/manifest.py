"""The layout of a prepared-data directory and its manifest (what the pretraining reads).

    OUT/manifest.json          configuration, tokenizer checksum and ids, one record per complete shard
    OUT/tokenizer.model        the SentencePiece model, `<pause>` included; or, for a Hugging Face tokenizer,
    OUT/tokenizer.json         its tokenizer.json (`<pause>` included) and tokenizer_config.json (eos, pad)
    OUT/std/<name>.bin|.idx    standard variant: packed windows, one indexed-dataset document per window
    OUT/pause/<name>.bin|.idx  pause variant: the same windows with pauses injected, cut back to seq_length
    OUT/shards/<name>.json     a shard's record, written last: its presence marks the shard complete

Every file is written under a temporary name (ending in .tmp) and renamed, so a killed run leaves no
half-written file under a final name; a .tmp file is a killed run's leftover, safe to delete.
"""

from __future__ import annotations

import json
import os
import socket

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"  # a SentencePiece tokenizer's file
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")  # what either kind stores in OUT
RECORDS = "shards"
VARIANTS = ("std", "pause")
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1  # bump when the bytes written for a given configuration change
# Settings that decide the bytes of every shard: an existing output built with others is refused.
# The tokenizer's identity is its kind, checksum and the special ids it writes (EOD after, BOS before a document).
# Its checksum covers the ids already (the SentencePiece model, or the tokenizer.json with its eos and pad); they
# are compared too so that a difference is named.
TOKENIZER_IDS = ("tokenizer_kind", "eod_id", "pad_id", "bos_id")
CONFIG_KEYS = ("format_version", "tokenizer_sha256", *TOKENIZER_IDS, "seq_length", "pause_ratio", "seed", "dtype")
# What a manifest from before a key was recorded had: a SentencePiece tokenizer, which adds no BOS.
LEGACY_CONFIG = {"tokenizer_kind": "sentencepiece", "bos_id": None}
COUNTS = ("documents", "windows", "tokens_std", "tokens_pause", "pauses")  # per shard, summed in "totals"


def shard_prefix(out_dir: str, variant: str, name: str) -> str:
    """Path prefix of a shard, as megatron-core's IndexedDataset takes it (the .bin/.idx paths add a suffix)."""
    return os.path.join(out_dir, variant, name)


def record_path(out_dir: str, name: str) -> str:
    """Path of a shard's record."""
    return os.path.join(out_dir, RECORDS, f"{name}.json")


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers see the old or the new file.

    The temporary name is the writer's own, so that builds of other shard ranges (other nodes) writing the
    same manifest never interleave their bytes; the last rename wins.
    """
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    """The JSON in `path`, or None when there is no such file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_records(out_dir: str) -> dict[str, dict]:
    """Every complete shard's record in OUT/shards, by shard name."""
    folder = os.path.join(out_dir, RECORDS)
    if not os.path.isdir(folder):
        return {}
    records = {}
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".json"):
            record = read_json(os.path.join(folder, entry))
            records[record["name"]] = record
    return records


def config_differences(old: dict, new: dict) -> list[str]:
    """The CONFIG_KEYS on which two manifests disagree, as 'key: old -> new' lines."""
    old = {**LEGACY_CONFIG, **old}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in CONFIG_KEYS if old.get(k) != new.get(k)]


def assemble_manifest(config: dict, records: dict[str, dict], *, complete: bool) -> dict:
    """The manifest: configuration, the shard records sorted by name, totals, and whether the run is done."""
    shards = [records[name] for name in sorted(records)]
    totals = {key: sum(r[key] for r in shards) for key in COUNTS}
    return {**config, "complete": complete, "totals": totals, "shards": shards}
