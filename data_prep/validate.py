"""Check a prepared-data directory against its manifest, reading the shards with megatron-core's IndexedDataset.

    python -m data_prep.build_c4 validate OUT [--max-windows-per-shard N] [--workers N]

Per shard: both variants open; they hold one document per window and the manifest's windows and tokens;
every window has seq_length tokens except a shard's last; std windows hold no pause; each pause window with
its pauses removed is a prefix of its std window; the pause count matches. Over all full pause windows: the
pause fraction (expected M / (seq_length + M): the cut keeps that share of the stream) and a chi-square test
that pause positions are uniform along the window. Exit code 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

with warnings.catch_warnings():  # megatron-core warns about Transformer Engine and apex, which this never uses
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: F401 (open_shard reads with it)

from data_prep import manifest as mf
from pause_megatron.progress import bar as progress_bar
from pause_megatron.data import DataError, open_shard
from pause_megatron import tokenizer as tokenizers
from pause_megatron.tokenizer import TokenizerMismatch

UNIFORMITY_BINS = 16
UNIFORMITY_MIN_P = 1e-3  # below this the positions are not uniform ...
UNIFORMITY_MAX_DEVIATION = 0.01  # ... unless no bin is 1% off: huge samples make a chi-square test too fussy
MIN_EXPECTED_PER_BIN = 5  # the chi-square approximation needs about this many pauses per bin
MAX_ERRORS_PER_SHARD = 10


@dataclass
class ShardCheck:
    """What validating one shard found."""

    name: str
    errors: list[str] = field(default_factory=list)
    windows_read: int = 0
    pauses_read: int = 0
    full_window_tokens: int = 0  # tokens of full pause windows read, the denominator of the pause fraction
    full_window_pauses: int = 0
    positions: np.ndarray = field(default_factory=lambda: np.zeros(UNIFORMITY_BINS, dtype=np.int64))

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_PER_SHARD:
            self.errors.append(f"{self.name}: {message}")


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square distributed with an integer number of degrees of freedom (closed form)."""
    half = x / 2.0
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) * math.exp(-half) / math.gamma(1.5)  # the i = 1 term of the odd-dof series
    for i in range(1, (dof + 1) // 2):
        total += term
        term *= half / (i + 0.5)
    return total


def _check_lengths(
    check: ShardCheck, lengths: np.ndarray, *, variant: str, expected_last: int, seq_length: int
) -> None:
    """Every window of `variant` has seq_length tokens except the last, which has `expected_last`."""
    if len(lengths) and (np.any(lengths[:-1] != seq_length) or lengths[-1] != expected_last):
        check.error(
            f"{variant} window lengths are not {seq_length} (last {expected_last}): {lengths[:3]}...{lengths[-3:]}"
        )


def check_shard(out_dir: str, record: dict, config: dict, *, max_windows: int | None) -> ShardCheck:
    """Validate one shard's two datasets against its manifest record."""
    check = ShardCheck(record["name"])
    if record["windows"] == 0:
        for variant in mf.VARIANTS:
            if os.path.exists(mf.shard_prefix(out_dir, variant, record["name"]) + ".bin"):
                check.error(f"{variant} files exist for a shard without windows")
        return check
    seq_length, pause_id = config["seq_length"], config["pause_id"]
    try:
        std, pause = (open_shard(os.path.join(out_dir, record[v])) for v in mf.VARIANTS)
    except DataError as e:  # a truncated or damaged .idx / .bin: the message names the file and the remedy
        check.error(str(e))
        return check
    windows = record["windows"]
    for variant, dataset in (("std", std), ("pause", pause)):
        if np.dtype(dataset.index.dtype).name != config["dtype"]:
            check.error(f"{variant} dtype {np.dtype(dataset.index.dtype).name}, manifest says {config['dtype']}")
        if len(dataset) != windows or not np.array_equal(dataset.document_indices, np.arange(windows + 1)):
            check.error(f"{variant} holds {len(dataset)} sequences, not {windows} one-window documents")
            return check
        if int(dataset.sequence_lengths.sum()) != record[f"tokens_{variant}"]:
            check.error(
                f"{variant} holds {dataset.sequence_lengths.sum()} tokens, manifest says {record[f'tokens_{variant}']}"
            )
    last = int(std.sequence_lengths[-1])
    _check_lengths(check, std.sequence_lengths, variant="std", expected_last=last, seq_length=seq_length)
    expected_pause_last = min(last + config["pauses_per_window"], seq_length)
    _check_lengths(
        check, pause.sequence_lengths, variant="pause", expected_last=expected_pause_last, seq_length=seq_length
    )

    to_read = windows if max_windows is None else min(windows, max_windows)
    for i in range(to_read):
        real, paused = std[i], pause[i]
        is_pause = paused == pause_id
        if np.any(real == pause_id):
            check.error(f"std window {i} holds a pause")
        kept = paused[~is_pause]
        if not np.array_equal(kept, real[: len(kept)]):
            check.error(f"pause window {i} without its pauses is not a prefix of std window {i}")
        n_pauses = int(is_pause.sum())
        check.pauses_read += n_pauses
        if len(paused) == seq_length and len(real) == seq_length:
            check.full_window_tokens += seq_length
            check.full_window_pauses += n_pauses
            check.positions += np.bincount(
                np.flatnonzero(is_pause) * UNIFORMITY_BINS // seq_length, minlength=UNIFORMITY_BINS
            )
    check.windows_read = to_read
    if to_read == windows and check.pauses_read != record["pauses"]:
        check.error(f"{check.pauses_read} pauses, manifest says {record['pauses']}")
    return check


@dataclass
class Uniformity:
    """Chi-square test of pause positions (bins along the window) against the uniform distribution."""

    chi2: float
    dof: int
    p_value: float
    max_deviation: float  # largest |observed / expected - 1| over the bins

    @property
    def ok(self) -> bool:
        return self.p_value >= UNIFORMITY_MIN_P or self.max_deviation <= UNIFORMITY_MAX_DEVIATION


def uniformity(positions: np.ndarray, *, seq_length: int) -> Uniformity | None:
    """The test for a histogram made with bin = position * bins // seq_length; None with too few pauses."""
    bins = len(positions)
    widths = np.bincount(np.arange(seq_length) * bins // seq_length, minlength=bins)
    expected = positions.sum() * widths / seq_length
    if expected.min() < MIN_EXPECTED_PER_BIN:
        return None
    chi2 = float(((positions - expected) ** 2 / expected).sum())
    return Uniformity(chi2, bins - 1, chi2_sf(chi2, bins - 1), float(np.abs(positions / expected - 1).max()))


def _check_tokenizer(out_dir: str, manifest: dict) -> list[str]:
    """The tokenizer in OUT is the one the manifest names, with the same special ids."""
    try:
        tokenizer = tokenizers.load(out_dir)
        tokenizer.check_matches(manifest, where=os.path.join(out_dir, mf.MANIFEST))
    except (FileNotFoundError, TokenizerMismatch) as e:
        return [str(e)]
    return [
        f"manifest {key} {manifest.get(key)} but the tokenizer has {value}"
        for key, value in tokenizer.ids().items()
        if manifest.get(key) != value
    ]


def validate(out_dir: str, *, max_windows_per_shard: int | None = None, workers: int = 1) -> dict:
    """Check OUT against its manifest; returns a report with 'errors' (empty when valid) and the statistics."""
    manifest = mf.read_json(os.path.join(out_dir, mf.MANIFEST))
    if manifest is None:
        return {"errors": [f"{out_dir}: no {mf.MANIFEST}"]}
    errors = _check_tokenizer(out_dir, manifest)
    if not manifest["complete"]:
        errors.append(f"{out_dir}: the build is not complete (rerun build to finish it)")
    on_disk = set(mf.read_records(out_dir))
    listed = {r["name"] for r in manifest["shards"]}
    if on_disk != listed:
        errors.append(f"shard records on disk and in the manifest differ: {sorted(on_disk ^ listed)[:5]}")
    for key, total in manifest["totals"].items():
        if total != sum(r[key] for r in manifest["shards"]):
            errors.append(f"manifest total {key} {total} is not the sum over its shards")
    checks = []
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("fork")
    ) as pool:
        futures = [
            pool.submit(check_shard, out_dir, record, manifest, max_windows=max_windows_per_shard)
            for record in manifest["shards"]
        ]
        for future in progress_bar(futures, desc="validate", unit="shard"):
            checks.append(future.result())
    for check in checks:
        errors.extend(check.errors)
    positions = sum((c.positions for c in checks), np.zeros(UNIFORMITY_BINS, dtype=np.int64))
    test = uniformity(positions, seq_length=manifest["seq_length"])
    if test is not None and not test.ok:
        errors.append(f"pause positions are not uniform: chi2 {test.chi2:.1f}, p {test.p_value:.2g}")
    full_tokens = sum(c.full_window_tokens for c in checks)
    m, n = manifest["pauses_per_window"], manifest["seq_length"]
    return {
        "errors": errors,
        "shards": len(checks),
        "windows": manifest["totals"]["windows"],
        "windows_read": sum(c.windows_read for c in checks),
        "pause_fraction": sum(c.full_window_pauses for c in checks) / full_tokens if full_tokens else None,
        "expected_pause_fraction": m / (n + m),
        "uniformity": test,
    }


def validate_command(args) -> int:
    """The validate subcommand: print the report; exit code 0 when OUT is valid."""
    report = validate(args.output, max_windows_per_shard=args.max_windows_per_shard, workers=args.workers)
    for error in report["errors"]:
        print(f"ERROR {error}")
    if "shards" in report:
        print(f"{report['shards']} shards, {report['windows']} windows ({report['windows_read']} read)")
        if report["pause_fraction"] is not None:
            print(
                f"pause fraction in full windows {report['pause_fraction']:.4%} "
                f"(expected about {report['expected_pause_fraction']:.4%})"
            )
        test = report["uniformity"]
        if test is None:
            print("pause positions: too few pauses for a uniformity test")
        else:
            print(
                f"pause positions over {UNIFORMITY_BINS} bins: chi2 {test.chi2:.1f} (dof {test.dof}), "
                f"p {test.p_value:.3g}, largest bin deviation {test.max_deviation:.2%}"
            )
    print("valid" if not report["errors"] else f"INVALID: {len(report['errors'])} problems")
    return 0 if not report["errors"] else 1
