"""Four inputs that used to end in a traceback: each is refused with the file named and the remedy, a non-zero
exit, and nothing already written lost."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from data_prep import build_c4, c4_sample
from helpers import python


def _gz(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def test_input_whose_every_line_is_bad_is_refused_before_the_tokenizer(tmp_path, capsys):
    docs = [{"text": d["text"]} for d in c4_sample.synthetic_documents(num_docs=20, seed=3)]
    _gz(tmp_path / "in" / "c4-train.00000-of-01024.json.gz", json.dumps(docs).encode())  # one JSON array
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = build_c4.main(["build", "--input", str(tmp_path / "in"), "--output", str(out), "--seq-length", "64",
                          "--vocab-size", "400", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == build_c4.EXIT_REFUSED
    assert str(tmp_path / "in") in err and "every line is bad" in err and "one JSON object" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_too_small_vocab_size_names_the_size_that_works(tmp_path, capsys):
    docs = c4_sample.synthetic_documents(num_docs=40, seed=4)
    _gz(tmp_path / "in" / "c4-train.00000-of-01024.json.gz", b"".join(json.dumps(d).encode() + b"\n" for d in docs))
    args = ["build", "--input", str(tmp_path / "in"), "--seq-length", "64", "--workers", "1"]
    code = build_c4.main([*args, "--output", str(tmp_path / "small"), "--vocab-size", "100"])
    err = capsys.readouterr().err
    assert code == build_c4.EXIT_REFUSED and "--vocab-size" in err and "vocab_size=100 is too small" in err
    assert not (tmp_path / "small").exists()
    needed = int(err.split("use a vocab size of at least ")[1].split()[0])
    assert build_c4.main([*args, "--output", str(tmp_path / "ok"), "--vocab-size", str(needed)]) == 0


@pytest.fixture
def truncated(tiny_c4, tmp_path):
    """A copy of the tiny corpus whose first pause shard's .idx lost its tail."""
    data = tmp_path / "c4"
    shutil.copytree(tiny_c4, data)
    idx = sorted((data / "pause").glob("*.idx"))[0]
    with open(idx, "r+b") as fh:
        fh.truncate(20)  # inside the header: megatron-core's reader dies in struct.unpack
    return data, idx


def test_validate_names_a_truncated_index_and_the_remedy(truncated, capsys):
    data, idx = truncated
    assert build_c4.main(["validate", str(data), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{idx}: cannot read the index" in out and "rebuild" in out


def test_pretraining_on_a_truncated_shard_is_refused_naming_it(truncated, tmp_path):
    data, idx = truncated
    before = {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    proc = python("-m", "pause_megatron.pretrain", "--config", "recipes/pretrain_tiny.yaml", f"data.path={data}",
                  "data.variant=pause", f"train.output_dir={tmp_path / 'run'}", "parallel.tensor=1",
                  "train.steps=6", "tracking.enabled=false", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{idx}: cannot read the index" in proc.stderr and "build_c4 validate" in proc.stderr
    assert {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    # Megatron-Core's apex / Transformer Engine fallback warnings (emitted when the training code is imported)
    # are dropped: pause_megatron.kernels states the decisions once per job instead
    assert "not installed" not in proc.stderr


def test_rerunning_the_build_rebuilds_exactly_the_truncated_shard(truncated, tiny_c4, capsys):
    data, idx = truncated
    whole = {p: p.stat().st_mtime_ns for p in data.rglob("c4-train.00001-*")}
    assert whole
    code = build_c4.main(["build", "--input", str(tiny_c4.parent / "json"), "--output", str(data),
                          "--seq-length", "128", "--vocab-size", "500", "--workers", "1"])
    assert code == 0 and "built 1 shards (1 already complete, skipped)" in capsys.readouterr().out
    assert idx.read_bytes() == (tiny_c4 / idx.relative_to(data)).read_bytes()  # the same build, whole again
    assert {p: p.stat().st_mtime_ns for p in whole} == whole  # the whole shard was not touched
    assert build_c4.main(["validate", str(data), "--workers", "1"]) == 0


@pytest.mark.parametrize("size", [0, 1000])
def test_validate_names_a_truncated_or_empty_bin(tiny_c4, tmp_path, capfd, size):
    data = tmp_path / "c4"
    shutil.copytree(tiny_c4, data)
    binary = sorted((data / "std").glob("*.bin"))[1]
    with open(binary, "r+b") as fh:
        fh.truncate(size)
    assert build_c4.main(["validate", str(data), "--workers", "1"]) == 1
    out, err = capfd.readouterr()
    assert f"{binary}: {'empty (0 bytes)' if size == 0 else '1000 bytes, but its index needs'}" in out
    assert ".idx" not in out.split("ERROR")[1].split("\n")[0] and "Traceback" not in err
