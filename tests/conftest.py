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
