"""A build killed for real (SIGKILL, mid-shard) resumes to byte-identical output; its workers do not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import build_c4, c4_sample
from data_prep import manifest as mf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = 3
REPEATS = 12  # each file: 250 documents repeated, about 2M tokens: long enough to be killed mid-shard
POLL_S = 0.005
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    """(input directory, tokenizer path)."""
    folder = tmp_path_factory.mktemp("resume")
    (folder / "c4").mkdir()
    docs = list(c4_sample.synthetic_documents(num_docs=250, seed=3))
    for i in range(FILES):
        rotated = docs[i:] + docs[:i]  # every file different
        c4_sample.write_c4_file(str(folder / "c4" / f"c4-train.{i:05d}-of-01024.json.gz"), rotated * REPEATS)
    tokenizer = str(folder / "test.model")
    build_c4.train_c4_tokenizer([d["text"] for d in docs], vocab_size=1000, seed=0).save(tokenizer)
    return str(folder / "c4"), tokenizer


def build_argv(corpus: tuple[str, str], out: str) -> list[str]:
    return ["build", "--input", corpus[0], "--output", out, "--tokenizer", corpus[1], "--workers", "1"]


def contents(folder: str) -> dict[str, bytes]:
    """Every file's bytes, but for .tmp leftovers (a kill during a manifest write may leave one)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name.endswith(mf.TMP_SUFFIX):
                continue
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def start_build(corpus: tuple[str, str], out: str, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "data_prep.build_c4", *build_argv(corpus, out)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_mid_build(process: subprocess.Popen, out: str) -> None:
    """Return once shard 0 is complete and shard 1 is being written."""
    done = mf.record_path(out, "c4-train.00000-of-01024")
    writing = mf.shard_prefix(out, "std", "c4-train.00001-of-01024") + ".bin" + mf.TMP_SUFFIX
    deadline = time.monotonic() + TIMEOUT_S
    while not (os.path.exists(done) and os.path.exists(writing)):
        assert process.poll() is None, "the build ended before it could be killed: make the files larger"
        assert time.monotonic() < deadline, "the build never reached shard 1"
        time.sleep(POLL_S)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killed_build_resumes_to_byte_identical_shards(corpus, tmp_path):
    clean = str(tmp_path / "clean")
    assert build_c4.main(build_argv(corpus, clean)) == 0
    out = str(tmp_path / "out")
    with open(tmp_path / "killed.log", "wb") as log:
        process = start_build(corpus, out, log)
        wait_until_mid_build(process, out)
        os.killpg(process.pid, signal.SIGKILL)  # the whole job, as scancel or a node failure does
        process.wait()
    assert os.path.exists(mf.shard_prefix(out, "std", "c4-train.00001-of-01024") + ".bin" + mf.TMP_SUFFIX)
    assert not os.path.exists(mf.record_path(out, "c4-train.00001-of-01024"))
    assert build_c4.main(build_argv(corpus, out)) == 0
    assert contents(out) == contents(clean)
    assert not any(name.endswith(mf.TMP_SUFFIX) for v in mf.VARIANTS for name in os.listdir(os.path.join(out, v)))


@pytest.mark.slow
def test_workers_stop_when_the_build_process_is_killed(corpus, tmp_path):
    out = str(tmp_path / "out")
    with open(tmp_path / "killed.log", "wb") as log:
        process = start_build(corpus, out, log)
        wait_until_mid_build(process, out)
        workers = children(process.pid)
        os.kill(process.pid, signal.SIGKILL)  # the main process only: its workers must notice and stop
        process.wait()
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the build process"
        time.sleep(0.05)
    assert not os.path.exists(mf.record_path(out, "c4-train.00002-of-01024"))
