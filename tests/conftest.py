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
