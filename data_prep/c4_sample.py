"""Synthetic C4-format json.gz files for tests, the benchmark and the demo (nothing here reaches the network).

Files follow C4's native layout: `c4-<split>.<NNNNN>-of-<MMMMM>.json.gz`, one JSON object per line with the
keys `text`, `timestamp` and `url` in that order. The text is English-like: words drawn from a generated
lexicon with Zipf frequencies, sentences grouped into newline-separated paragraphs, a few non-ASCII words.
The same seed gives the same files.

    python -m data_prep.c4_sample OUT_DIR --files 4 --docs-per-file 1000 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Iterable, Iterator

import numpy as np

C4_FILE_TEMPLATE = "c4-{split}.{index:05d}-of-{total:05d}.json.gz"
C4_TRAIN_FILES = 1024  # C4 en ships its train split as 1024 json.gz files
LEXICON_SIZE = 20_000
ZIPF_EXPONENT = 1.1  # word frequencies in English fall off roughly as 1/rank
MEAN_WORDS_PER_DOC = 400  # C4 en averages about 400 words (about 2.2k characters) per document
NON_ASCII_WORDS = ("café", "naïve", "Zürich", "façade", "São", "東京", "Ελλάδα", "😀", "über", "—")
NON_ASCII_RATE = 0.005  # share of words replaced by a non-ASCII one: exercises byte fallback and UTF-8
SYLLABLES = tuple(c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ou", "ea"))


def _lexicon(rng: np.random.Generator) -> list[str]:
    """LEXICON_SIZE distinct pseudo-words of 1 to 4 syllables (the first ones short, like frequent words)."""
    words: dict[str, None] = {}
    while len(words) < LEXICON_SIZE:
        n = 1 + min(3, int(rng.exponential(0.6 + 2.0 * len(words) / LEXICON_SIZE)))
        words["".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), size=n))] = None
    return list(words)


def _document_text(rng: np.random.Generator, *, lexicon: list[str], cdf: np.ndarray) -> str:
    """One English-like document: paragraphs of sentences of Zipf-distributed words, separated by newlines."""
    n_words = max(5, int(rng.lognormal(np.log(MEAN_WORDS_PER_DOC) - 0.5, 1.0)))
    words = [lexicon[i] for i in np.searchsorted(cdf, rng.random(n_words))]
    for i in np.flatnonzero(rng.random(n_words) < NON_ASCII_RATE):
        words[i] = NON_ASCII_WORDS[rng.integers(len(NON_ASCII_WORDS))]
    paragraphs, sentences, start = [], [], 0
    while start < n_words:
        end = min(n_words, start + int(rng.integers(4, 30)))
        sentence = " ".join(words[start:end])
        sentences.append(sentence[:1].upper() + sentence[1:] + ("." if rng.random() < 0.9 else "?"))
        start = end
        if rng.random() < 0.25 or start == n_words:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n".join(paragraphs)


def synthetic_documents(*, num_docs: int, seed: int) -> Iterator[dict]:
    """`num_docs` C4 records {"text", "timestamp", "url"}, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    lexicon = _lexicon(np.random.default_rng(0))  # one lexicon for every seed: files share a vocabulary
    weights = 1.0 / np.arange(1, LEXICON_SIZE + 1) ** ZIPF_EXPONENT
    cdf = np.cumsum(weights) / weights.sum()
    for _ in range(num_docs):
        text = _document_text(rng, lexicon=lexicon, cdf=cdf)
        day, second = int(rng.integers(1, 29)), int(rng.integers(0, 86_400))
        timestamp = f"2019-04-{day:02d}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"
        host, page = (lexicon[i] for i in rng.integers(0, 2000, size=2))
        yield {"text": text, "timestamp": timestamp, "url": f"https://www.{host}.com/{page}.html"}


def write_c4_file(path: str, records: Iterable[dict]) -> None:
    """Write records as a C4 json.gz file, one JSON object per line."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_c4_sample(
    out_dir: str, *, num_files: int, docs_per_file: int, seed: int = 0, split: str = "train"
) -> list[str]:
    """Write `num_files` C4-format files of `docs_per_file` documents each; returns their paths in order."""
    os.makedirs(out_dir, exist_ok=True)
    total = max(num_files, C4_TRAIN_FILES) if split == "train" else num_files
    paths = []
    for index in range(num_files):
        path = os.path.join(out_dir, C4_FILE_TEMPLATE.format(split=split, index=index, total=total))
        write_c4_file(path, synthetic_documents(num_docs=docs_per_file, seed=seed * 1_000_003 + index))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic C4-format json.gz files.")
    parser.add_argument("out_dir")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--docs-per-file", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    paths = write_c4_sample(
        args.out_dir, num_files=args.files, docs_per_file=args.docs_per_file, seed=args.seed, split=args.split
    )
    print(f"wrote {len(paths)} files of {args.docs_per_file} documents to {args.out_dir}")


if __name__ == "__main__":
    main()
