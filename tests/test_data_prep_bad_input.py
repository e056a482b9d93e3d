"""Bad C4 input: counted per file with its line number and skipped, or an error under --strict; nothing lost."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from data_prep import build_c4, c4_sample
from data_prep import c4_input
from data_prep import manifest as mf
from data_prep.c4_input import InputReport, read_c4_file
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pause_megatron.tokenizer import PauseTokenizer

BAD_LINE = 3  # 1-based line of the bad record in each file below
GOOD_DOCS = 6


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    docs = [d["text"] for d in c4_sample.synthetic_documents(num_docs=300, seed=99)]
    path = str(tmp_path_factory.mktemp("tok") / "test.model")
    build_c4.train_c4_tokenizer(docs, vocab_size=1000, seed=0).save(path)
    return path


@pytest.fixture(scope="module")
def good_docs() -> list[str]:
    return [d["text"] for d in c4_sample.synthetic_documents(num_docs=GOOD_DOCS, seed=11)]


def c4_line(text: str) -> bytes:
    return (
        json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.com/"}).encode() + b"\n"
    )


def write_gz(path, lines: list[bytes]) -> str:
    with gzip.open(path, "wb") as f:
        f.write(b"".join(lines))
    return str(path)


def with_bad_line(good_docs: list[str], bad: bytes) -> list[bytes]:
    lines = [c4_line(t) for t in good_docs]
    return lines[: BAD_LINE - 1] + [bad] + lines[BAD_LINE - 1 :]


def build(input_path: str, out: str, tokenizer_path: str, *extra: str) -> int:
    argv = ["build", "--input", input_path, "--output", out, "--tokenizer", tokenizer_path, "--workers", "2", *extra]
    return build_c4.main(argv)


def std_documents(out: str, name: str, tokenizer: PauseTokenizer) -> list[str]:
    dataset = IndexedDataset(mf.shard_prefix(out, "std", name))
    stream = np.concatenate([np.array(dataset[i]) for i in range(len(dataset))])
    return [tokenizer.decode(d) for d in np.split(stream, np.flatnonzero(stream == tokenizer.eod_id) + 1)[:-1]]


def record(out: str, name: str) -> dict:
    return mf.read_json(mf.record_path(out, name))


BAD_LINES = {
    "malformed JSON": (b'{"text": "no closing brace"\n', c4_input.MALFORMED_JSON),
    "blank line": (b"\n", c4_input.MALFORMED_JSON),
    "not an object": (b'["text", "a list"]\n', c4_input.BAD_TEXT),
    "missing text": (b'{"url": "https://example.com/"}\n', c4_input.BAD_TEXT),
    "number text": (b'{"text": 5}\n', c4_input.BAD_TEXT),
    "null text": (b'{"text": null}\n', c4_input.BAD_TEXT),
    "empty text": (b'{"text": ""}\n', c4_input.EMPTY_DOCUMENT),
    "whitespace text": (b'{"text": " \\n\\t "}\n', c4_input.EMPTY_DOCUMENT),
    "invalid UTF-8 bytes": (b'{"text": "caf\xe9 au lait"}\n', c4_input.INVALID_UTF8),
    "lone surrogate escape": (b'{"text": "broken \\ud800 pair"}\n', c4_input.INVALID_UTF8),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_counted_with_its_line_number_and_skipped(case, good_docs, tokenizer_path, tmp_path, capsys):
    bad, kind = BAD_LINES[case]
    path = write_gz(tmp_path / "c4-train.00000-of-01024.json.gz", with_bad_line(good_docs, bad))
    out = str(tmp_path / "out")
    assert build(path, out, tokenizer_path) == 0
    got = record(out, "c4-train.00000-of-01024")
    assert got["bad_lines"] == {kind: 1}
    assert got["bad_line_examples"][0]["line"] == BAD_LINE and got["bad_line_examples"][0]["kind"] == kind
    assert got["documents"] == GOOD_DOCS and got["lines"] == GOOD_DOCS + 1
    tok = PauseTokenizer.load(os.path.join(out, mf.TOKENIZER))
    assert std_documents(out, "c4-train.00000-of-01024", tok) == good_docs  # the good ones, in order
    printed = capsys.readouterr().out
    assert f"1 {kind}" in printed and f"(lines {BAD_LINE})" in printed


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_is_an_error_naming_file_and_line_under_strict(case, good_docs, tokenizer_path, tmp_path, capsys):
    bad, kind = BAD_LINES[case]
    path = write_gz(tmp_path / "c4-train.00000-of-01024.json.gz", with_bad_line(good_docs, bad))
    out = str(tmp_path / "out")
    assert build(path, out, tokenizer_path, "--strict") == build_c4.EXIT_BAD_INPUT
    assert f"{path}:{BAD_LINE}: {kind}" in capsys.readouterr().out
    assert os.listdir(os.path.join(out, "std")) == os.listdir(os.path.join(out, "pause")) == []  # no tmp left
    assert mf.read_json(os.path.join(out, mf.MANIFEST))["complete"] is False


def truncated_gz(path, good_docs: list[str]) -> tuple[str, int]:
    """A gzip file cut in the middle of its stream; returns it and how many whole lines it still yields."""
    data = gzip.compress(b"".join(c4_line(t) for t in good_docs * 20))
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    report = InputReport(where=str(path))
    return str(path), len(list(read_c4_file(str(path), report=report)))


UNREADABLE = {
    "empty file": (lambda p, docs: open(p, "wb").close(), c4_input.EMPTY_INPUT),
    "gzip without lines": (lambda p, docs: write_gz(p, []), c4_input.EMPTY_INPUT),
    "not gzip": (lambda p, docs: open(p, "wb").write(b'{"text": "plain json"}\n'), c4_input.CORRUPT_GZIP),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_file_is_reported_and_gets_no_shard(case, good_docs, tokenizer_path, tmp_path, capsys):
    make, kind = UNREADABLE[case]
    path = str(tmp_path / "c4-train.00000-of-01024.json.gz")
    make(path, good_docs)
    out = str(tmp_path / "out")
    assert build(path, out, tokenizer_path) == 0
    got = record(out, "c4-train.00000-of-01024")
    assert got["read_error"]["kind"] == kind and got["windows"] == 0 and got["std"] is None
    assert os.listdir(os.path.join(out, "std")) == []  # megatron-core cannot open an empty dataset
    assert kind in capsys.readouterr().out
    assert build(path, str(tmp_path / "strict"), tokenizer_path, "--strict") == build_c4.EXIT_BAD_INPUT
    assert f"{path}:0: {kind}" in capsys.readouterr().out


def test_truncated_gzip_keeps_the_documents_before_the_cut(good_docs, tokenizer_path, tmp_path, capsys):
    path, whole = truncated_gz(tmp_path / "c4-train.00000-of-01024.json.gz", good_docs)
    assert 0 < whole < len(good_docs) * 20
    out = str(tmp_path / "out")
    assert build(path, out, tokenizer_path) == 0
    got = record(out, "c4-train.00000-of-01024")
    assert got["read_error"]["kind"] == c4_input.TRUNCATED_GZIP and got["read_error"]["after_line"] == whole
    assert got["documents"] == whole
    tok = PauseTokenizer.load(os.path.join(out, mf.TOKENIZER))
    assert std_documents(out, "c4-train.00000-of-01024", tok) == (good_docs * 20)[:whole]
    assert f"truncated_gzip after line {whole}" in capsys.readouterr().out
    assert build(path, str(tmp_path / "strict"), tokenizer_path, "--strict") == build_c4.EXIT_BAD_INPUT
    assert f"{path}:{whole}: truncated_gzip" in capsys.readouterr().out


def test_a_file_gone_after_listing_is_reported_missing():
    report = InputReport(where="/nonexistent/c4-train.00000-of-01024.json.gz")
    assert list(read_c4_file(report.where, report=report)) == []
    assert report.read_error["kind"] == c4_input.MISSING_INPUT


@pytest.mark.parametrize("what", ["missing directory", "empty directory", "glob matching nothing"])
def test_no_input_is_refused(what, tokenizer_path, tmp_path, capsys):
    pattern = {
        "missing directory": str(tmp_path / "nowhere"),
        "empty directory": str(tmp_path),
        "glob matching nothing": str(tmp_path / "c4-train.*.json.gz"),
    }[what]
    out = str(tmp_path / "out")
    assert build(pattern, out, tokenizer_path) == build_c4.EXIT_REFUSED
    assert "no input" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_strict_failure_keeps_every_shard_already_written(good_docs, tokenizer_path, tmp_path):
    corpus = tmp_path / "c4"
    corpus.mkdir()
    for i in range(2):
        write_gz(corpus / f"c4-train.{i:05d}-of-01024.json.gz", [c4_line(t) for t in good_docs])
    out = str(tmp_path / "out")
    assert build(str(corpus), out, tokenizer_path) == 0
    shards = {}
    for folder in (*mf.VARIANTS, mf.RECORDS):
        for name in os.listdir(os.path.join(out, folder)):
            path = os.path.join(out, folder, name)
            shards[path] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    write_gz(corpus / "c4-train.00002-of-01024.json.gz", with_bad_line(good_docs, b"{oops\n"))
    assert build(str(corpus), out, tokenizer_path, "--strict") == build_c4.EXIT_BAD_INPUT
    for path, (data, mtime) in shards.items():
        assert open(path, "rb").read() == data and os.stat(path).st_mtime_ns == mtime
    listed = [r["name"] for r in mf.read_json(os.path.join(out, mf.MANIFEST))["shards"]]
    assert listed == ["c4-train.00000-of-01024", "c4-train.00001-of-01024"]
    assert sorted(os.listdir(os.path.join(out, "std"))) == sorted(
        os.path.basename(p) for p in shards if p.startswith(os.path.join(out, "std"))
    )


def test_a_repaired_input_file_is_rebuilt_on_rerun(good_docs, tokenizer_path, tmp_path):
    """A truncated download is reported; once the whole file is there, a rerun rebuilds that shard only."""
    path, whole = truncated_gz(tmp_path / "c4-train.00000-of-01024.json.gz", good_docs)
    out = str(tmp_path / "out")
    assert build(path, out, tokenizer_path) == 0
    assert record(out, "c4-train.00000-of-01024")["documents"] == whole
    write_gz(path, [c4_line(t) for t in good_docs * 20])
    assert build(path, out, tokenizer_path) == 0
    repaired = record(out, "c4-train.00000-of-01024")
    assert repaired["documents"] == len(good_docs) * 20 and repaired["read_error"] is None
