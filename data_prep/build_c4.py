"""Offline C4 data prep: json.gz -> token ids -> packed windows -> Megatron indexed shards, std and pause.

    python -m data_prep.build_c4 build --input DIR_OR_GLOB --output OUT [--seq-length 2048] [--pause-ratio 0.1]
        [--seed 1234] [--workers N] [--tokenizer DIR_OR_FILE | --vocab-size V] [--strict] [--overwrite]
    python -m data_prep.build_c4 validate OUT

(`pause-build-c4` is the same command; `build` is the default subcommand.) Per input file, in one worker
process: documents are tokenized, EOD is appended to each, and the token stream is cut into consecutive
windows of seq_length tokens (the file's last window may be shorter). Each window becomes one document of
OUT/std/<name>, and — through the pause rule, seeded by (seed, shard index, window index) — one document of
OUT/pause/<name>. The output therefore depends on the seed and the inputs only, never on the worker count.
The layout of OUT and the resume rules are in data_prep/manifest.py; docs/data.md has the full story.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib.metadata
import itertools
import math
import multiprocessing
import os
import queue
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

with warnings.catch_warnings():  # megatron-core warns about Transformer Engine and apex, which data prep never uses
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from data_prep import manifest as mf
from data_prep.c4_input import BadInput, InputReport, check_records, hf_records, list_inputs, read_c4_file
from data_prep.c4_input import shard_indices, shard_name
from data_prep.validate import validate_command
from pause_megatron.data import DataError, open_shard
from pause_megatron.pauses import PAPER_SEQ_LENGTH, PRETRAIN_PAUSE_RATIO, inject_pauses, num_pretrain_pauses
from pause_megatron.pauses import window_rng
from pause_megatron.progress import bar as progress_bar
from pause_megatron import tokenizer as tokenizers
from pause_megatron.tokenizer import DEFAULT_VOCAB_SIZE, BaseTokenizer, PauseTokenizer, TokenizerMismatch
from pause_megatron.tokenizer import TokenizerTrainingError, train_tokenizer

DEFAULT_SEED = 1234
DEFAULT_TOKENIZER_SAMPLE_DOCS = 100_000  # about 200 MB of C4 text; train_tokenizer samples at most 1M of its lines
DEFAULT_HF_DOCS_PER_SHARD = 50_000  # about 150 MB of records, held in memory until a worker has written them
ENCODE_BATCH_DOCS = 256  # documents per tokenizer call: amortizes the call, keeps a worker's memory small
QUEUED_SHARDS = 1  # submitted beyond the running ones: no worker waits, and --hf reads the stream little ahead
PROGRESS_INTERVAL_S = 0.2
EXIT_BAD_INPUT = 1  # bad input under --strict, or a shard that failed
EXIT_REFUSED = 2  # nothing to do, or an existing output that this run must not touch


class BuildRefused(RuntimeError):
    """The run must not start: no input, colliding inputs, or an output built with another configuration."""


def tool_version() -> str:
    """The installed pause-megatron version, recorded in every manifest."""
    try:
        return importlib.metadata.version("pause-megatron")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------------------------------------- tokenizer


def train_c4_tokenizer(documents: Iterable[str], *, vocab_size: int, seed: int) -> PauseTokenizer:
    """A lossless SentencePiece model trained on the lines of `documents` (`<pause>`, EOD, pad included).

    Lines, not documents, are SentencePiece's sentences: it skips sentences over 4192 bytes, which would
    drop most C4 documents.
    """
    lines = [line for text in documents for line in text.split("\n") if line and not line.isspace()]
    return train_tokenizer(lines, vocab_size=vocab_size, seed=seed)


def file_sample(paths: list[str], *, num_docs: int) -> list[str]:
    """A deterministic sample of `num_docs` documents: the first good ones of every file, equally many each."""
    per_file = math.ceil(num_docs / len(paths))
    sample: list[str] = []
    for path in paths:  # bad lines are skipped here; the shard pass reports them
        sample.extend(itertools.islice(read_c4_file(path, report=InputReport(where=path)), per_file))
    return sample[:num_docs]


# ---------------------------------------------------------------------------------------------- packing


def with_eod(docs_ids: list[list[int]], *, eod_id: int, dtype, bos_ids: Sequence[int] = ()) -> np.ndarray:
    """The documents' token ids concatenated, each document followed by EOD (and preceded by `bos_ids`: the
    tokenizer's BOS, when it has one)."""
    eod, bos = (eod_id,), tuple(bos_ids)
    total = sum(map(len, docs_ids)) + len(docs_ids) * (1 + len(bos))
    return np.fromiter(
        itertools.chain.from_iterable(x for ids in docs_ids for x in (bos, ids, eod)), dtype=dtype, count=total
    )


def pack_windows(chunks: Iterable[np.ndarray], *, seq_length: int) -> Iterator[np.ndarray]:
    """Cut a token stream, given in chunks, into consecutive windows of `seq_length`; the last may be shorter."""
    carry = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        stream = np.concatenate([carry, chunk]) if len(carry) else chunk
        full = len(stream) - len(stream) % seq_length
        for start in range(0, full, seq_length):
            yield stream[start : start + seq_length]
        carry = stream[full:]
    if len(carry):
        yield carry


# ---------------------------------------------------------------------------------------------- one shard


@dataclass(frozen=True)
class ShardTask:
    """One output shard: from an input file (`records` None) or from a chunk of a streamed dataset."""

    name: str
    index: int  # seeds the pause positions (see c4_input.shard_indices)
    input: str
    input_bytes: int | None  # the input file's size when listed; a different size means a different file
    records: tuple | None = None


@dataclass(frozen=True)
class ShardSettings:
    """What every worker needs, sent once when the pool starts."""

    out_dir: str
    seq_length: int
    pause_ratio: float
    seed: int
    strict: bool
    tokenizer: BaseTokenizer  # sent pickled as its serialized model (either kind)


def _shard_files(out_dir: str, name: str) -> dict[str, str]:
    """Final path of each of a shard's four files, keyed like 'std.bin'."""
    return {
        f"{variant}{ext}": mf.shard_prefix(out_dir, variant, name) + ext
        for variant in mf.VARIANTS
        for ext in (".bin", ".idx")
    }


def _remove(paths: Iterable[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _token_chunks(
    texts: Iterable[str], *, tokenizer: BaseTokenizer, dtype, counts: Counter, on_progress: Callable
) -> Iterator[np.ndarray]:
    """Tokenize `texts` in batches; yield each batch as one EOD-separated token array; count documents."""
    texts = iter(texts)
    while batch := list(itertools.islice(texts, ENCODE_BATCH_DOCS)):
        chunk = with_eod(tokenizer.encode_batch(batch), eod_id=tokenizer.eod_id, dtype=dtype, bos_ids=tokenizer.bos_ids)
        counts["documents"] += len(batch)
        on_progress(len(batch), len(chunk))
        yield chunk


def build_shard(task: ShardTask, *, settings: ShardSettings, tokenizer: BaseTokenizer, on_progress: Callable) -> dict:
    """Write the std and pause shards of one input and its record; returns the record.

    Files are written under temporary names and renamed once complete, the record last. A shard without
    any document (an empty or unreadable input) gets a record but no files: megatron-core cannot open an
    empty indexed dataset. Raises BadInput under strict, after removing its temporary files.
    """
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    report = InputReport(where=task.input, strict=settings.strict)
    if task.records is None:
        texts = read_c4_file(task.input, report=report)
    else:
        texts = check_records(task.records, report=report)
    final = _shard_files(settings.out_dir, task.name)
    tmp = {key: path + mf.TMP_SUFFIX for key, path in final.items()}
    counts: Counter = Counter()
    try:
        builders = {v: IndexedDatasetBuilder(tmp[f"{v}.bin"], dtype=dtype) for v in mf.VARIANTS}
        chunks = _token_chunks(texts, tokenizer=tokenizer, dtype=dtype, counts=counts, on_progress=on_progress)
        for window_index, window in enumerate(pack_windows(chunks, seq_length=settings.seq_length)):
            rng = window_rng(seed=settings.seed, shard_index=task.index, window_index=window_index)
            paused = inject_pauses(
                window, pause_id=tokenizer.pause_id, seq_length=settings.seq_length, rng=rng, ratio=settings.pause_ratio
            )
            builders["std"].add_document(window, [len(window)])
            builders["pause"].add_document(paused, [len(paused)])
            counts["windows"] += 1
            counts["tokens_std"] += len(window)
            counts["tokens_pause"] += len(paused)
            counts["pauses"] += int(np.count_nonzero(paused == tokenizer.pause_id))
        for variant, builder in builders.items():
            builder.finalize(tmp[f"{variant}.idx"])
    except BaseException:
        _remove(tmp.values())
        raise
    if counts["windows"]:
        for key in final:
            os.replace(tmp[key], final[key])
    else:
        _remove([*tmp.values(), *final.values()])
    record = {
        "name": task.name,
        "shard_index": task.index,
        "input": task.input,
        "input_bytes": task.input_bytes,
        "documents": counts["documents"],
        "windows": counts["windows"],
        "tokens_std": counts["tokens_std"],
        "tokens_pause": counts["tokens_pause"],
        "pauses": counts["pauses"],
        **{variant: (f"{variant}/{task.name}" if counts["windows"] else None) for variant in mf.VARIANTS},
        **report.as_record(),
    }
    mf.write_json_atomic(mf.record_path(settings.out_dir, task.name), record)
    return record


def is_complete(record: dict | None, *, task: ShardTask, out_dir: str, itemsize: int) -> bool:
    """Whether a previous run finished this shard, from this very input, and its files are all there."""
    if record is None or record["input_bytes"] != task.input_bytes or record["input"] != task.input:
        return False
    files = _shard_files(out_dir, task.name)
    if record["windows"] == 0:
        return not any(os.path.exists(p) for p in files.values())
    if not all(os.path.exists(p) for p in files.values()) or not all(
        os.path.getsize(files[f"{v}.bin"]) == record[f"tokens_{v}"] * itemsize for v in mf.VARIANTS
    ):
        return False
    # A truncated or damaged .idx next to a whole .bin is rebuilt too: megatron-core's reader opens it (a memory
    # map, cheap) and must find the shard's windows, all inside the .bin
    for variant in mf.VARIANTS:
        try:
            dataset = open_shard(mf.shard_prefix(out_dir, variant, task.name))
        except DataError:
            return False
        windows = len(dataset.index.sequence_lengths)
        del dataset
        if windows != record["windows"]:
            return False
    return True


# ---------------------------------------------------------------------------------------------- workers

_worker: dict = {}  # per worker process: settings, tokenizer, progress queue, the parent's pid


class _BuildProcessGone(Exception):
    """The build process died (killed): its workers stop rather than finish shards nobody will record."""


def _init_worker(settings: ShardSettings, progress: multiprocessing.Queue, parent_pid: int) -> None:
    _worker.update(
        settings=settings,
        tokenizer=settings.tokenizer,
        progress=progress,
        parent_pid=parent_pid,
    )


def _worker_progress(docs: int, tokens: int) -> None:
    if os.getppid() != _worker["parent_pid"]:
        raise _BuildProcessGone
    _worker["progress"].put((docs, tokens))


def _build_shard_in_worker(task: ShardTask) -> dict:
    try:
        return build_shard(
            task, settings=_worker["settings"], tokenizer=_worker["tokenizer"], on_progress=_worker_progress
        )
    except _BuildProcessGone:  # build_shard removed its temporary files; the pool's queues would keep us waiting
        os._exit(1)


def run_shards(
    tasks: Iterable[ShardTask], *, settings: ShardSettings, workers: int, on_record: Callable[[dict], None]
) -> list[str]:
    """Build `tasks` on a pool of `workers` processes with a progress bar; returns the failures' messages.

    After the first failure no new shard starts; the shards already running finish and are recorded.
    """
    context = multiprocessing.get_context("fork")  # workers inherit the imported modules: no re-import
    progress = context.Queue()
    failures: list[str] = []
    tasks = iter(tasks)
    in_flight: dict[concurrent.futures.Future, ShardTask] = {}

    def submit_more(pool: concurrent.futures.ProcessPoolExecutor) -> None:
        while not failures and len(in_flight) < workers + QUEUED_SHARDS:
            task = next(tasks, None)
            if task is None:
                return
            in_flight[pool.submit(_build_shard_in_worker, task)] = task

    start, tokens, shards_done = time.perf_counter(), 0, 0
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(settings, progress, os.getpid())
    ) as pool:
        submit_more(pool)  # starts the workers before the progress bar starts its thread: fork wants no threads
        with progress_bar(unit="doc", unit_scale=True, desc="build") as bar:
            while in_flight:
                done, _ = concurrent.futures.wait(in_flight, timeout=PROGRESS_INTERVAL_S, return_when="FIRST_COMPLETED")
                while True:
                    try:
                        docs, n = progress.get_nowait()
                    except queue.Empty:
                        break
                    bar.update(docs)
                    tokens += n
                for future in done:
                    task = in_flight.pop(future)
                    try:
                        record = future.result()
                    except Exception as e:  # noqa: BLE001 - a failed shard is reported; the running ones finish
                        failures.append(str(e) if isinstance(e, BadInput) else f"{task.name}: {type(e).__name__}: {e}")
                        bar.write(f"FAILED {failures[-1]}")
                        continue
                    shards_done += 1
                    on_record(record)
                    bar.write(_shard_line(record))
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s, {shards_done} shards done", refresh=False)
                submit_more(pool)
    return failures


def _shard_line(record: dict) -> str:
    """One line per finished shard: counts, and what was wrong with its input."""
    line = f"{record['name']}: {record['documents']} docs, {record['windows']} windows, {record['tokens_std']} tokens"
    problems = [f"{n} {kind}" for kind, n in record["bad_lines"].items()]
    if record["read_error"]:
        error = record["read_error"]
        problems.append(f"{error['kind']} after line {error['after_line']}")
    if problems:
        lines = ", ".join(str(e["line"]) for e in record["bad_line_examples"])
        line += f" — skipped: {'; '.join(problems)}" + (f" (lines {lines})" if lines else "")
    return line


# ---------------------------------------------------------------------------------------------- a build


def _file_tasks(paths: list[str]) -> list[ShardTask]:
    """One task per input file, with its shard index."""
    names = {path: shard_name(path) for path in paths}
    if len(set(names.values())) < len(paths):
        raise ValueError("two inputs have the same file name; their shards would collide")
    indices = shard_indices(list(names.values()))
    return [ShardTask(name=names[p], index=indices[names[p]], input=p, input_bytes=os.path.getsize(p)) for p in paths]


def _batched(items: Iterable, size: int) -> Iterator[tuple]:
    items = iter(items)
    while batch := tuple(itertools.islice(items, size)):
        yield batch


def _hf_tasks(*, path: str, config: str, split: str, docs_per_shard: int,
              shard_range: tuple[int, int] | None = None, on_end: Callable[[int], None] | None = None
              ) -> Iterator[ShardTask]:
    """One task per `docs_per_shard` streamed records; shard i is named <dataset>-<config>-<split>.<i:05d>.

    Lazy: one shard's records in memory at a time. With a shard range, the records before its start are passed
    over untouched (counted, not tokenized) and the stream is read no further than its end, plus one record to
    learn whether the dataset goes on. `on_end(n)` is called when the stream is seen to end: it has n shards.
    """
    prefix = f"{path.rsplit('/', 1)[-1]}-{config}-{split}"
    records = iter(hf_records(path=path, config=config, split=split))
    start, stop = shard_range or (0, None)
    passed = sum(1 for _ in itertools.islice(records, start * docs_per_shard))
    index = start
    if passed < start * docs_per_shard:  # the stream ends before the range
        index = -(-passed // docs_per_shard)
    while stop is None or index < stop:
        chunk = tuple(itertools.islice(records, docs_per_shard))
        if not chunk:
            break
        where = f"{path}:{config}:{split}[{index * docs_per_shard}:{index * docs_per_shard + len(chunk)}]"
        yield ShardTask(name=f"{prefix}.{index:05d}", index=index, input=where, input_bytes=None, records=chunk)
        index += 1
        if len(chunk) < docs_per_shard:
            break
    else:  # the range's end: does the stream go on?
        if next(records, None) is not None:
            return
    if on_end is not None:
        on_end(index)


def _in_range(task: ShardTask, shard_range: tuple[int, int] | None) -> bool:
    return shard_range is None or shard_range[0] <= task.index < shard_range[1]


def resolve_tokenizer(args, *, manifest: dict | None, sample: Callable[[], list[str]]) -> tuple[BaseTokenizer, dict]:
    """The run's tokenizer and how it was obtained; trains one only when there is none to reuse.

    --tokenizer is a SentencePiece .model, a tokenizer.json or a directory holding either (tokenizers.load). A
    rerun on an existing output reuses the tokenizer stored in OUT, unless it asks for a tokenizer of its own.
    """
    if args.tokenizer:
        tokenizer = tokenizers.load(args.tokenizer)
        if not tokenizer.lossless:
            print(f"note: {args.tokenizer} normalizes text: the std shards will not reproduce documents byte for byte")
        return tokenizer, {"given": os.path.abspath(args.tokenizer)}
    wanted = {
        "trained": {
            "vocab_size": args.vocab_size or DEFAULT_VOCAB_SIZE,
            "sample_docs": _sample_size(args),
        }
    }
    if manifest is not None and not args.overwrite:
        asked = args.vocab_size is not None or args.tokenizer_sample_docs is not None
        if asked and manifest["tokenizer_source"] != wanted:
            raise BuildRefused(
                f"{args.output} holds a tokenizer from {manifest['tokenizer_source']}; this run asks for {wanted}"
            )
        return tokenizers.load(args.output), manifest["tokenizer_source"]
    print(
        f"training a {wanted['trained']['vocab_size']}-piece tokenizer on {wanted['trained']['sample_docs']} documents"
    )
    source = args.input or args.hf
    docs = sample()
    if not docs:  # SentencePiece would die on an empty sample ("!sentences_.empty()")
        raise BuildRefused(
            f"{source}: no good document to train the tokenizer on, every line is bad (C4 files hold one JSON object "
            'with a "text" field per line; a file holding one JSON array is not that format); fix the input, or '
            "pass --tokenizer to use an existing tokenizer"
        )
    try:
        return train_c4_tokenizer(docs, vocab_size=wanted["trained"]["vocab_size"], seed=args.seed), wanted
    except TokenizerTrainingError as e:
        raise BuildRefused(f"{source}: {e} (--vocab-size)") from None


def run_config(tokenizer: BaseTokenizer, *, args, tokenizer_source: dict) -> dict:
    """The manifest's configuration part."""
    return {
        "tool": "data_prep.build_c4",
        "tool_version": tool_version(),
        "format_version": mf.FORMAT_VERSION,
        **tokenizer.record(),  # tokenizer_kind, tokenizer_sha256 and the special ids
        "tokenizer_source": tokenizer_source,
        "seq_length": args.seq_length,
        "pause_ratio": args.pause_ratio,
        "pauses_per_window": num_pretrain_pauses(seq_length=args.seq_length, ratio=args.pause_ratio),
        "seed": args.seed,
        "dtype": np.dtype(DType.optimal_dtype(tokenizer.vocab_size)).name,
    }


STREAM_END = "stream_end.json"  # --hf: how many shards the stream makes, once a run has seen it end


def _record_stream_end(out_dir: str, shards: int) -> None:
    """Kept beside the manifest, which the runs of one array build each rewrite: any run may be the one that saw
    the end, and whichever finishes last decides whether the build is complete."""
    os.makedirs(out_dir, exist_ok=True)
    mf.write_json_atomic(os.path.join(out_dir, STREAM_END), {"shards": shards})


def _remove_outputs(out_dir: str) -> None:
    """Remove what a build writes in OUT (and nothing else that may live there)."""
    for folder in (*mf.VARIANTS, mf.RECORDS):
        shutil.rmtree(os.path.join(out_dir, folder), ignore_errors=True)
    _remove(os.path.join(out_dir, f) for f in (mf.MANIFEST, *mf.TOKENIZER_FILES, STREAM_END))


def _sample_size(args) -> int:
    return args.tokenizer_sample_docs or DEFAULT_TOKENIZER_SAMPLE_DOCS


def _hf_sample(args) -> list[str]:
    """The tokenizer sample of the --hf branch: the first documents of the stream."""
    stream = hf_records(path=args.hf, config=args.hf_config, split=args.hf_split)
    return list(itertools.islice(check_records(stream, report=InputReport(where=args.hf)), _sample_size(args)))


def _tasks_and_sample(args) -> tuple[Iterable[ShardTask], Callable[[], list[str]]]:
    """The run's shard tasks (a list for files, a lazy stream for --hf) and how to draw the tokenizer sample."""
    if args.hf:
        tasks = _hf_tasks(
            path=args.hf, config=args.hf_config, split=args.hf_split, docs_per_shard=args.hf_docs_per_shard,
            shard_range=args.shard_range, on_end=functools.partial(_record_stream_end, args.output)
        )
        return tasks, functools.partial(_hf_sample, args)
    try:
        paths = list_inputs(args.input)
        return _file_tasks(paths), functools.partial(file_sample, paths, num_docs=_sample_size(args))
    except (FileNotFoundError, ValueError) as e:
        raise BuildRefused(str(e)) from e


def _refuse_incompatible(args, *, manifest: dict, config: dict, records: dict, tasks: Iterable[ShardTask]) -> None:
    """Raise BuildRefused if OUT was built with another configuration or with other shard indices."""
    differences = mf.config_differences(manifest, config)
    if differences:
        raise BuildRefused(
            f"{args.output} was built with another configuration ({'; '.join(differences)}); "
            "rerun with the same settings to resume, or pass --overwrite to rebuild it"
        )
    for task in tasks if isinstance(tasks, list) else ():  # --hf shard names carry their index: nothing to check
        old = records.get(task.name)
        if old is not None and old["shard_index"] != task.index:
            raise BuildRefused(f"{task.name} was built as shard {old['shard_index']}, now it is {task.index}")


def _prepare_output(args, *, tokenizer: BaseTokenizer) -> None:
    """Create OUT's folders (emptied first under --overwrite) and store the tokenizer unless it is there."""
    if args.overwrite:
        _remove_outputs(args.output)
    for folder in ("", *mf.VARIANTS, mf.RECORDS):
        os.makedirs(os.path.join(args.output, folder), exist_ok=True)
    stored = tokenizers.tokenizer_file(args.output)
    if stored is None or tokenizers.load(stored).record() != tokenizer.record():
        _remove(os.path.join(args.output, f) for f in mf.TOKENIZER_FILES)  # one tokenizer: `load(OUT)` finds it
        tokenizer.save(os.path.join(args.output, tokenizer.file_name))


def build(args) -> int:
    """The build subcommand; returns the exit code."""
    started = time.perf_counter()
    tasks, sample = _tasks_and_sample(args)
    # Everything that can refuse the run happens before anything is written.
    manifest = mf.read_json(os.path.join(args.output, mf.MANIFEST))
    tokenizer, source = resolve_tokenizer(args, manifest=manifest, sample=sample)
    config = run_config(tokenizer, args=args, tokenizer_source=source)
    records: dict[str, dict] = {}  # without a manifest, records are leftovers of an unknown configuration
    if manifest is not None and not args.overwrite:
        records = mf.read_records(args.output)
        _refuse_incompatible(args, manifest=manifest, config=config, records=records, tasks=tasks)
    _prepare_output(args, tokenizer=tokenizer)
    manifest_path = os.path.join(args.output, mf.MANIFEST)
    mf.write_json_atomic(manifest_path, mf.assemble_manifest(config, records, complete=False))

    itemsize = np.dtype(config["dtype"]).itemsize
    skipped: list[str] = []
    new_records: list[dict] = []

    every: list[str] = []  # every input's shard name, in range or not

    def todo() -> Iterator[ShardTask]:
        for task in tasks:
            every.append(task.name)
            if not _in_range(task, args.shard_range):
                continue
            if is_complete(records.get(task.name), task=task, out_dir=args.output, itemsize=itemsize):
                skipped.append(task.name)
            else:
                yield task

    def on_record(record: dict) -> None:
        records[record["name"]] = record
        new_records.append(record)
        mf.write_json_atomic(manifest_path, mf.assemble_manifest(config, records, complete=False))

    settings = ShardSettings(
        out_dir=args.output,
        seq_length=args.seq_length,
        pause_ratio=args.pause_ratio,
        seed=args.seed,
        strict=args.strict,
        tokenizer=tokenizer,
    )
    failures = run_shards(todo(), settings=settings, workers=args.workers, on_record=on_record)
    # Complete only when every input has a record: a --shard-range run that leaves others to other tasks is not.
    complete = not failures and all(name in records for name in every)
    if args.hf and args.shard_range:
        # A stream read only up to a range's end: complete once some run saw the stream end (whichever) and
        # every shard up to there has its record (the other runs' included, read back from OUT).
        records = {**mf.read_records(args.output), **records}
        end = mf.read_json(os.path.join(args.output, STREAM_END))
        prefix = f"{args.hf.rsplit('/', 1)[-1]}-{args.hf_config}-{args.hf_split}"
        complete = (not failures and end is not None
                    and all(f"{prefix}.{i:05d}" in records for i in range(end["shards"])))
    mf.write_json_atomic(manifest_path, mf.assemble_manifest(config, records, complete=complete))
    _print_summary(new_records, skipped=skipped, failures=failures, seconds=time.perf_counter() - started)
    return EXIT_BAD_INPUT if failures else 0


def _print_summary(records: list[dict], *, skipped: list[str], failures: list[str], seconds: float) -> None:
    """What this run did: shards, documents, tokens, pauses, speed, and every problem met."""
    total = Counter({key: sum(r[key] for r in records) for key in mf.COUNTS})
    bad = Counter()
    for record in records:
        bad.update(record["bad_lines"])
    print(f"built {len(records)} shards ({len(skipped)} already complete, skipped) in {seconds:.1f} s")
    print(
        f"  {total['documents']} documents, {total['windows']} windows, {total['tokens_std']} tokens (std), "
        f"{total['tokens_pause']} tokens (pause), {total['pauses']} pauses "
        f"({total['pauses'] / max(total['tokens_pause'], 1):.2%} of pause tokens)"
    )
    print(f"  {total['documents'] / seconds:.0f} docs/s, {total['tokens_std'] / seconds:.0f} tokens/s end to end")
    print(f"  skipped bad lines: {dict(sorted(bad.items())) or 'none'}")
    for record in records:
        if record["bad_lines"] or record["read_error"]:
            print("  " + _shard_line(record))
    for failure in failures:
        print(f"  FAILED {failure}")


# ---------------------------------------------------------------------------------------------- command line


def _shard_range(text: str) -> tuple[int, int]:
    start, _, stop = text.partition(":")
    return int(start), int(stop)


def _pause_ratio(text: str) -> float:
    ratio = float(text)
    num_pretrain_pauses(seq_length=PAPER_SEQ_LENGTH, ratio=ratio)  # raises on a ratio outside [0, 1)
    return ratio


def parser() -> argparse.ArgumentParser:
    """The command line: `build` (the default) and `validate`."""
    top = argparse.ArgumentParser(prog="pause-build-c4", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the std and pause shards of C4 json.gz files")
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory of C4 *.json.gz files, a glob, or one file")
    source.add_argument("--hf", metavar="DATASET", help="stream a Hugging Face dataset instead (allenai/c4)")
    b.add_argument("--hf-config", default="en", help="--hf dataset configuration (default en)")
    b.add_argument("--hf-split", default="train", help="--hf split (default train)")
    b.add_argument(
        "--hf-docs-per-shard",
        type=int,
        default=DEFAULT_HF_DOCS_PER_SHARD,
        help=f"--hf records per output shard (default {DEFAULT_HF_DOCS_PER_SHARD})",
    )
    b.add_argument("--output", required=True, help="output directory OUT")
    b.add_argument("--seq-length", type=int, default=PAPER_SEQ_LENGTH, help=f"window (default {PAPER_SEQ_LENGTH})")
    b.add_argument(
        "--pause-ratio",
        type=_pause_ratio,
        default=PRETRAIN_PAUSE_RATIO,
        help=f"pauses per window as a share of seq-length (default {PRETRAIN_PAUSE_RATIO})",
    )
    b.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seeds the pause positions (default {DEFAULT_SEED})")
    b.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes (default: CPUs)")
    tok = b.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="DIR_OR_FILE",
                     help="an existing tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json, or a model "
                          "directory holding either (<pause> is added if missing)")
    tok.add_argument("--vocab-size", type=int, help=f"train a tokenizer of this size (default {DEFAULT_VOCAB_SIZE})")
    b.add_argument(
        "--tokenizer-sample-docs",
        type=int,
        help=f"documents to train the tokenizer on (default {DEFAULT_TOKENIZER_SAMPLE_DOCS})",
    )
    b.add_argument("--shard-range", type=_shard_range, metavar="START:STOP", help="only shard indices in [START, STOP)")
    b.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    b.add_argument("--overwrite", action="store_true", help="rebuild an output made with another configuration")
    v = sub.add_parser("validate", help="check OUT's shards against its manifest")
    v.add_argument("output")
    v.add_argument("--max-windows-per-shard", type=int, help="read only this many windows of each shard")
    v.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="worker processes (default: CPUs)")
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m data_prep.build_c4` and `pause-build-c4`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("build", "validate", "-h", "--help"):
        argv.insert(0, "build")
    args = parser().parse_args(argv)
    if args.command == "validate":
        return validate_command(args)
    if args.seq_length < 1 or args.workers < 1:
        print("error: --seq-length and --workers must be positive", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return build(args)
    except (BuildRefused, FileNotFoundError, TokenizerMismatch) as e:  # a --tokenizer that is not there or unusable
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
