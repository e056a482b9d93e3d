"""Offline C4 data prep (data_prep.build_c4): packing, pauses, manifest, determinism, resume, validation."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_prep import build_c4, c4_sample
from data_prep import manifest as mf
from data_prep.c4_input import InputReport, read_c4_file, shard_indices
from data_prep.validate import chi2_sf, validate
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pause_megatron.pauses import PAPER_SEQ_LENGTH, PRETRAIN_PAUSE_RATIO, inject_pauses, num_pretrain_pauses
from pause_megatron.tokenizer import PAUSE_PIECE, PauseTokenizer, train_tokenizer

PAPER_PAUSES_PER_WINDOW = round(PRETRAIN_PAUSE_RATIO * PAPER_SEQ_LENGTH)  # M_pt = round(0.1 * 2048) = 205
SEED = 1234
TEST_VOCAB = 1000  # small enough to train in about a second, large enough for 256 byte pieces
NUM_FILES, DOCS_PER_FILE = 3, 40  # about 13 windows of 2048 tokens per file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A directory of C4-format files."""
    folder = str(tmp_path_factory.mktemp("c4"))
    c4_sample.write_c4_sample(folder, num_files=NUM_FILES, docs_per_file=DOCS_PER_FILE, seed=7)
    return folder


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> str:
    docs = [d["text"] for d in c4_sample.synthetic_documents(num_docs=300, seed=99)]
    path = str(tmp_path_factory.mktemp("tok") / "test.model")
    build_c4.train_c4_tokenizer(docs, vocab_size=TEST_VOCAB, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def built(corpus, tokenizer_path, tmp_path_factory) -> str:
    """OUT of one build of the corpus with the paper's settings (read-only for the tests that use it)."""
    out = str(tmp_path_factory.mktemp("built") / "out")
    assert run_build(corpus, out, tokenizer_path, "--workers", "2") == 0
    return out


def run_build(input_dir: str, out: str, tokenizer_path: str | None, *extra: str) -> int:
    argv = ["build", "--input", input_dir, "--output", out, "--seed", str(SEED), *extra]
    if tokenizer_path:
        argv += ["--tokenizer", tokenizer_path]
    return build_c4.main(argv)


def documents_of(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def windows(out: str, variant: str, name: str) -> list[np.ndarray]:
    dataset = IndexedDataset(mf.shard_prefix(out, variant, name))
    return [np.array(dataset[i]) for i in range(len(dataset))]


def manifest(out: str) -> dict:
    return mf.read_json(os.path.join(out, mf.MANIFEST))


def snapshot(folder: str) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def contents(folder: str) -> dict[str, bytes]:
    return {path: data for path, (data, _) in snapshot(folder).items()}


# ------------------------------------------------------------------------------------------- packing


def test_with_eod_appends_eod_after_every_document():
    out = build_c4.with_eod([[5, 6], [], [7]], eod_id=2, dtype=np.uint16)
    assert out.tolist() == [5, 6, 2, 2, 7, 2]
    assert out.dtype == np.uint16


def test_pack_windows_cuts_consecutive_windows_and_keeps_the_short_tail():
    stream = np.arange(23, dtype=np.uint16)
    chunks = [stream[:4], stream[4:5], stream[5:17], stream[17:]]
    got = list(build_c4.pack_windows(chunks, seq_length=5))
    assert [len(w) for w in got] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(got), stream)


def test_trained_tokenizer_round_trips_what_default_normalization_would_lose():
    docs = [d["text"] for d in c4_sample.synthetic_documents(num_docs=200, seed=3)]
    lines = [line for d in docs for line in d.split("\n")]
    tok = train_tokenizer(lines, vocab_size=TEST_VOCAB)
    tricky = "Two  spaces,\na newline,\ttab, ﬁ ligature, 東京 😀 trailing "
    assert tok.lossless
    assert tok.decode(tok.encode(tricky)) == tricky  # nmt_nfkc would fold the spaces and the newline


def test_shard_index_is_the_c4_file_number_whatever_subset_is_given():
    assert shard_indices(["c4-train.00007-of-01024", "c4-train.00003-of-01024"]) == {
        "c4-train.00003-of-01024": 3,
        "c4-train.00007-of-01024": 7,
    }
    assert shard_indices(["b", "a"]) == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="share shard index 0"):
        shard_indices(["c4-train.00000-of-01024", "c4-validation.00000-of-00008"])


def test_chi2_survival_function_matches_known_quantiles():
    # 95th percentiles of the chi-square distribution for 1, 2, 15 and 16 degrees of freedom
    for x, dof in ((3.841, 1), (5.991, 2), (24.996, 15), (26.296, 16)):
        assert chi2_sf(x, dof) == pytest.approx(0.05, abs=2e-4)


# ------------------------------------------------------------------------------------------- a build


def test_std_variant_round_trips_every_document_in_order(built, corpus):
    tok = PauseTokenizer.load(os.path.join(built, mf.TOKENIZER))
    for path in sorted(os.listdir(corpus)):
        name = path[: -len(".json.gz")]
        stream = np.concatenate(windows(built, "std", name))
        ends = np.flatnonzero(stream == tok.eod_id)
        assert ends[-1] == len(stream) - 1  # the stream ends with the last document's EOD
        docs = [tok.decode(d) for d in np.split(stream, ends + 1)[:-1]]
        assert docs == documents_of(os.path.join(corpus, path))


def test_every_window_is_one_document_of_seq_length_tokens_but_the_last(built):
    for record in manifest(built)["shards"]:
        for variant in mf.VARIANTS:
            dataset = IndexedDataset(mf.shard_prefix(built, variant, record["name"]))
            assert len(dataset) == record["windows"]
            np.testing.assert_array_equal(dataset.document_indices, np.arange(record["windows"] + 1))
            assert set(dataset.sequence_lengths[:-1].tolist()) == {PAPER_SEQ_LENGTH}
        std = IndexedDataset(mf.shard_prefix(built, "std", record["name"]))  # kept alive: its arrays map its file
        assert std.sequence_lengths[-1] < PAPER_SEQ_LENGTH


def test_pause_windows_follow_the_pause_rule_with_per_window_seeds(built):
    tok = PauseTokenizer.load(os.path.join(built, mf.TOKENIZER))
    for record in manifest(built)["shards"]:
        std, pause = windows(built, "std", record["name"]), windows(built, "pause", record["name"])
        for w, (real, paused) in enumerate(zip(std, pause, strict=True)):
            rng = np.random.default_rng([SEED, record["shard_index"], w])
            replay = inject_pauses(real, pause_id=tok.pause_id, seq_length=PAPER_SEQ_LENGTH, rng=rng)
            np.testing.assert_array_equal(paused, replay)


def test_full_pause_windows_get_round_10_percent_of_2048_pauses_before_the_cut(built):
    """Replays each window untruncated: same draws (M pauses among len+1 gaps), a cut long enough to keep all."""
    tok = PauseTokenizer.load(os.path.join(built, mf.TOKENIZER))
    m = num_pretrain_pauses(seq_length=PAPER_SEQ_LENGTH)
    assert m == PAPER_PAUSES_PER_WINDOW
    for record in manifest(built)["shards"]:
        std, pause = windows(built, "std", record["name"]), windows(built, "pause", record["name"])
        for w, (real, paused) in enumerate(zip(std[:-1], pause[:-1], strict=True)):
            uncut = inject_pauses(
                real,
                pause_id=tok.pause_id,
                seq_length=len(real) + m,
                ratio=m / (len(real) + m),
                rng=np.random.default_rng([SEED, record["shard_index"], w]),
            )
            assert np.count_nonzero(uncut == tok.pause_id) == PAPER_PAUSES_PER_WINDOW
            assert len(paused) == PAPER_SEQ_LENGTH
            np.testing.assert_array_equal(paused, uncut[:PAPER_SEQ_LENGTH])
            kept = paused[paused != tok.pause_id]
            np.testing.assert_array_equal(kept, real[: len(kept)])  # real tokens: a prefix, in order


def test_manifest_records_the_configuration_and_the_counts_of_each_shard(built, corpus):
    got = manifest(built)
    tok = PauseTokenizer.load(os.path.join(built, mf.TOKENIZER))
    assert got["complete"] is True
    assert got["tokenizer_sha256"] == tok.checksum
    assert {k: got[k] for k in tok.ids()} == tok.ids()
    assert (got["seq_length"], got["pause_ratio"], got["seed"], got["dtype"]) == (2048, 0.1, SEED, "uint16")
    assert got["pauses_per_window"] == PAPER_PAUSES_PER_WINDOW
    assert got["tool_version"] and got["format_version"] == mf.FORMAT_VERSION
    assert [r["name"] for r in got["shards"]] == sorted(p[: -len(".json.gz")] for p in os.listdir(corpus))
    for record in got["shards"]:
        std, pause = windows(built, "std", record["name"]), windows(built, "pause", record["name"])
        assert record["documents"] == DOCS_PER_FILE
        assert record["windows"] == len(std) == len(pause)
        assert record["tokens_std"] == sum(map(len, std))
        assert record["tokens_pause"] == sum(map(len, pause))
        assert record["pauses"] == sum(int(np.count_nonzero(p == tok.pause_id)) for p in pause)
        assert record["bad_lines"] == {} and record["read_error"] is None
    assert got["totals"]["documents"] == NUM_FILES * DOCS_PER_FILE


def test_output_is_identical_for_one_and_two_workers(built, corpus, tokenizer_path, tmp_path):
    assert run_build(corpus, str(tmp_path / "one"), tokenizer_path, "--workers", "1") == 0
    assert contents(str(tmp_path / "one")) == contents(built)


def test_validate_accepts_a_good_build_and_reports_the_pause_fraction(built):
    report = validate(built, workers=2)
    assert report["errors"] == []
    assert report["windows_read"] == manifest(built)["totals"]["windows"]
    m, n = PAPER_PAUSES_PER_WINDOW, PAPER_SEQ_LENGTH
    assert report["pause_fraction"] == pytest.approx(m / (n + m), abs=0.005)
    assert report["uniformity"].ok


def test_validate_finds_a_changed_token_and_a_wrong_count(built, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(built, out)
    record = manifest(out)["shards"][0]
    with open(mf.shard_prefix(out, "pause", record["name"]) + ".bin", "r+b") as f:
        f.seek(2 * 100)
        f.write(np.array([65535], dtype=np.uint16).tobytes())  # token 100 of the first pause window: no real id
    m = manifest(out)
    m["shards"][1]["windows"] += 1
    mf.write_json_atomic(os.path.join(out, mf.MANIFEST), m)
    errors = "\n".join(validate(out)["errors"])
    assert f"{record['name']}: pause window 0 without its pauses is not a prefix" in errors
    assert m["shards"][1]["name"] in errors and "one-window documents" in errors


def test_validate_command_exit_code(built, capsys):
    assert build_c4.main(["validate", built]) == 0
    assert "valid" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- reruns


def test_rerun_skips_complete_shards_and_redoes_partial_ones(built, corpus, tokenizer_path, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(built, out)
    names = [r["name"] for r in manifest(out)["shards"]]
    # shard 1: killed after its renames, before its record; shard 2: killed while writing
    os.remove(mf.record_path(out, names[1]))
    for variant in mf.VARIANTS:
        os.rename(
            mf.shard_prefix(out, variant, names[2]) + ".bin", mf.shard_prefix(out, variant, names[2]) + ".bin.tmp"
        )
        os.remove(mf.shard_prefix(out, variant, names[2]) + ".idx")
    os.remove(mf.record_path(out, names[2]))
    before = snapshot(out)
    assert run_build(corpus, out, tokenizer_path) == 0
    after = snapshot(out)
    for variant in mf.VARIANTS:  # the complete shard was not rewritten
        path = os.path.join(variant, names[0] + ".bin")
        assert after[path][1] == before[path][1]
    assert contents(out) == contents(built)


def test_rerun_with_another_configuration_is_refused_and_changes_nothing(
    built, corpus, tokenizer_path, tmp_path, capsys
):
    out = str(tmp_path / "out")
    shutil.copytree(built, out)
    before = snapshot(out)
    for flag, value in (("--seq-length", "1024"), ("--pause-ratio", "0.2"), ("--seed", "5")):
        assert run_build(corpus, out, tokenizer_path, flag, value) == build_c4.EXIT_REFUSED
        assert "--overwrite" in capsys.readouterr().err
    other = str(tmp_path / "other.model")
    docs = [d["text"] for d in c4_sample.synthetic_documents(num_docs=200, seed=5)]
    build_c4.train_c4_tokenizer(docs, vocab_size=TEST_VOCAB + 100, seed=0).save(other)
    assert run_build(corpus, out, other) == build_c4.EXIT_REFUSED
    assert "tokenizer_sha256" in capsys.readouterr().err
    assert snapshot(out) == before


def test_overwrite_rebuilds_an_output_made_with_another_configuration(built, corpus, tokenizer_path, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(built, out)
    assert run_build(corpus, out, tokenizer_path, "--seq-length", "1024", "--overwrite") == 0
    got = manifest(out)
    assert got["seq_length"] == 1024 and got["pauses_per_window"] == round(0.1 * 1024)
    assert validate(out)["errors"] == []


def test_trained_tokenizer_is_lossless_recorded_and_reused_on_rerun(corpus, tmp_path):
    out = str(tmp_path / "out")
    args = ["--vocab-size", str(TEST_VOCAB), "--tokenizer-sample-docs", "60"]
    assert run_build(corpus, out, None, *args) == 0
    got = manifest(out)
    assert got["tokenizer_source"] == {"trained": {"vocab_size": TEST_VOCAB, "sample_docs": 60}}
    tok = PauseTokenizer.load(os.path.join(out, mf.TOKENIZER))
    assert tok.lossless and tok.checksum == got["tokenizer_sha256"]
    before = snapshot(out)
    assert run_build(corpus, out, None) == 0  # same command without tokenizer flags: resumes, trains nothing
    assert contents(out) == {k: v for k, (v, _) in before.items()}
    assert run_build(corpus, out, None, "--vocab-size", str(TEST_VOCAB + 50)) == build_c4.EXIT_REFUSED


def test_given_tokenizer_without_pause_gets_it_added(corpus, tmp_path):
    plain = str(tmp_path / "plain")
    docs = [d["text"] for d in c4_sample.synthetic_documents(num_docs=200, seed=5)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_prefix=plain, vocab_size=TEST_VOCAB, byte_fallback=True, minloglevel=2
    )
    out = str(tmp_path / "out")
    assert run_build(corpus, out, plain + ".model") == 0
    tok = PauseTokenizer.load(os.path.join(out, mf.TOKENIZER))
    assert tok.sp.id_to_piece(tok.pause_id) == PAUSE_PIECE
    assert manifest(out)["pause_id"] == tok.pause_id == TEST_VOCAB


def test_shard_range_builds_only_the_selected_shards(corpus, tokenizer_path, tmp_path):
    out = str(tmp_path / "out")
    assert run_build(corpus, out, tokenizer_path, "--shard-range", "1:2") == 0
    assert [r["shard_index"] for r in manifest(out)["shards"]] == [1]
    assert manifest(out)["complete"] is False  # the other inputs have no shard yet
    assert run_build(corpus, out, tokenizer_path) == 0  # the rest: now every input has its record
    assert manifest(out)["complete"] is True and len(manifest(out)["shards"]) == NUM_FILES


def test_hf_stream_feeds_the_same_packing(monkeypatch, corpus, built, tokenizer_path, tmp_path):
    """The --hf branch, with datasets' stream replaced by the corpus' records (the hub is not reachable here)."""
    paths = sorted(os.path.join(corpus, p) for p in os.listdir(corpus))
    records = [json.loads(line) for p in paths for line in gzip.open(p, "rt", encoding="utf-8")]
    monkeypatch.setattr(build_c4, "hf_records", lambda **_: iter(records))
    out = str(tmp_path / "out")
    argv = ["build", "--hf", "allenai/c4", "--hf-docs-per-shard", str(DOCS_PER_FILE), "--output", out]
    assert build_c4.main([*argv, "--tokenizer", tokenizer_path, "--seed", str(SEED)]) == 0
    got = manifest(out)["shards"]
    assert [r["name"] for r in got] == [f"c4-en-train.{i:05d}" for i in range(NUM_FILES)]
    for record, name in zip(got, sorted(r["name"] for r in manifest(built)["shards"]), strict=True):
        for variant in mf.VARIANTS:  # chunk i holds file i's documents and gets shard index i: same bytes
            with open(mf.shard_prefix(out, variant, record["name"]) + ".bin", "rb") as a:
                with open(mf.shard_prefix(built, variant, name) + ".bin", "rb") as b:
                    assert a.read() == b.read()


def test_sample_generator_writes_the_c4_layout(tmp_path):
    paths = c4_sample.write_c4_sample(str(tmp_path), num_files=2, docs_per_file=3, seed=1)
    assert [os.path.basename(p) for p in paths] == [
        "c4-train.00000-of-01024.json.gz",
        "c4-train.00001-of-01024.json.gz",
    ]
    with gzip.open(paths[0], "rt", encoding="utf-8") as f:
        record = json.loads(f.readline())
    assert list(record) == ["text", "timestamp", "url"]
    assert c4_sample.write_c4_sample(str(tmp_path / "again"), num_files=1, docs_per_file=3, seed=1)
    assert documents_of(paths[0]) == documents_of(str(tmp_path / "again" / "c4-train.00000-of-01024.json.gz"))


def test_reading_yields_the_text_of_each_line_in_order(corpus):
    path = os.path.join(corpus, sorted(os.listdir(corpus))[0])
    report = InputReport(where=path)
    assert list(read_c4_file(path, report=report)) == documents_of(path)
    assert report.lines == DOCS_PER_FILE and not report.bad_lines


def test_hf_shard_range_reads_the_stream_only_up_to_its_end(monkeypatch, corpus, tokenizer_path, tmp_path):
    """--hf with --shard-range: the records before the range are passed over, the stream is read up to the
    range's end plus one record (to learn whether it goes on), and the ranges of an array build may finish in
    any order: the build is complete once every shard up to the stream's end is there, whichever run saw it."""
    paths = sorted(os.path.join(corpus, p) for p in os.listdir(corpus))
    records = [json.loads(line) for p in paths for line in gzip.open(p, "rt", encoding="utf-8")]
    per_shard = 20
    shards = len(records) // per_shard
    assert shards == 6 and len(records) % per_shard == 0
    read = []

    def stream(**_):
        for r in records:
            read.append(r)
            yield r

    monkeypatch.setattr(build_c4, "hf_records", stream)
    out = str(tmp_path / "out")
    argv = ["build", "--hf", "allenai/c4", "--hf-docs-per-shard", str(per_shard), "--output", out,
            "--tokenizer", tokenizer_path, "--seed", str(SEED)]

    def build(first, last):
        read.clear()
        assert build_c4.main([*argv, "--shard-range", f"{first}:{last}"]) == 0
        return manifest(out)

    built = build(1, 2)
    assert len(read) == 2 * per_shard + 1 < len(records)
    assert [r["name"] for r in built["shards"]] == ["c4-en-train.00001"] and built["complete"] is False
    assert build(3, shards + 5)["complete"] is False  # the stream ends in this range; shards 0 and 2 missing
    # shards 0 and 1 are there, as many as the range 0:1 needs, but the stream goes on past them: not complete
    assert build(0, 1)["complete"] is False
    built = build(2, 3)  # the last missing shard, in a range that does not hold the stream's end
    assert len(read) == 3 * per_shard + 1
    assert built["complete"] is True and len(built["shards"]) == shards


def test_hf_shard_range_streams_lazily(monkeypatch):
    """A range's records are read shard by shard as the build takes them, never the whole range at once."""
    read = []

    def stream(**_):
        for i in range(1000):
            read.append(i)
            yield {"text": str(i)}

    monkeypatch.setattr(build_c4, "hf_records", stream)
    ends = []
    tasks = build_c4._hf_tasks(path="c4", config="en", split="train", docs_per_shard=10, shard_range=(2, 50),
                               on_end=ends.append)
    first = next(tasks)
    assert first.index == 2 and len(read) == 30 and [r["text"] for r in first.records][0] == "20"
    rest = list(tasks)
    assert len(rest) == 47 and len(read) == 501 and ends == []  # up to the range's end, plus one record
    assert list(build_c4._hf_tasks(path="c4", config="en", split="train", docs_per_shard=10, shard_range=(95, 200),
                                   on_end=ends.append))[-1].index == 99 and ends == [100]
