"""Shared fixtures."""

import pytest


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """A few hundred English-like documents, enough to train a small SentencePiece model."""
    import random

    rng = random.Random(0)
    words = ("the a pause token model learns to think before it speaks while reading many long documents "
             "about rivers mountains cities numbers 1 2 3 42 and questions answers café naïve über").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))).capitalize() + "." for _ in range(400)]


TINY_SEQ = 128  # the tiny preset's sequence length


@pytest.fixture(scope="session")
def tiny_c4(tmp_path_factory):
    """A small C4-format corpus run through the real data prep (std + pause shards, seq 128)."""
    from helpers import python

    root = tmp_path_factory.mktemp("c4")
    python("-m", "data_prep.c4_sample", str(root / "json"), "--files", "2", "--docs-per-file", "150")
    python("-m", "data_prep.build_c4", "build", "--input", str(root / "json"), "--output", str(root / "out"),
           "--seq-length", str(TINY_SEQ), "--vocab-size", "500", "--workers", "2")
    return root / "out"


SAMPLE_TASKS = "pause_megatron/sample_tasks"  # the nine tasks' built-in rows, in each dataset's own format


@pytest.fixture(scope="session")
def pretrained(tiny_c4, tmp_path_factory):
    """A tiny PausePT checkpoint (30 steps on the tiny corpus), the start of every finetuning test."""
    from helpers import torchrun

    out = tmp_path_factory.mktemp("pretrained")
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={out}", "model.preset=tiny",
             "train.steps=30", "optim.lr=2e-3", "train.global_batch_size=8", "train.micro_batch_size=4",
             "tracking.enabled=false")
    return out / "checkpoints"
