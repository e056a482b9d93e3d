"""SentencePiece with `<pause>`, EOD and pad: train one on a corpus sample, or load one and add `<pause>`.

`<pause>` is one extra CONTROL piece at the end of the vocabulary (the paper's single new embedding outside
the normal vocabulary). Being a control piece, no text ever encodes to it — a literal "<pause>" in C4 stays
text — and it decodes to nothing. EOD is SentencePiece's `</s>`; pad is `<pad>`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from typing import Iterable, Optional

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

TRAIN_THREADS = 16  # SentencePiece's trained model depends on its thread count: fixed, for reproducibility
PAUSE_PIECE = "<pause>"
PAD_PIECE = "<pad>"
DEFAULT_VOCAB_SIZE = 32000  # the paper's models use a 32k SentencePiece vocabulary (T5-style)


class TokenizerTrainingError(ValueError):
    """SentencePiece cannot train on this input with these settings; the message says why and what to change."""


class TokenizerMismatch(ValueError):
    """Data or a checkpoint was made with a different tokenizer than the one loaded."""


def padded_vocab_size(vocab_size: int, *, tensor_parallel: int = 1, divisible_by: int = 128) -> int:
    """Round the vocabulary up to a multiple of lcm(divisible_by, tensor_parallel).

    Unlike Megatron-LM (divisible_by x TP), the padded size does not change with TP whenever TP divides
    `divisible_by` (1, 2, 4, 8, ... 128), so a checkpoint's embedding reshards across TP layouts unchanged.
    """
    multiple = math.lcm(divisible_by, tensor_parallel)
    return ((vocab_size + multiple - 1) // multiple) * multiple


def has_pause_piece(model_proto: bytes) -> bool:
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return any(p.piece == PAUSE_PIECE for p in proto.pieces)


def _with_pause_piece(model_proto: bytes) -> bytes:
    """The model with `<pause>` appended as a control piece, unless it already has one."""
    if has_pause_piece(model_proto):
        return model_proto
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    piece = proto.pieces.add()
    piece.piece = PAUSE_PIECE
    piece.score = 0.0
    piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


class PauseTokenizer:
    """A SentencePiece model that is guaranteed to have `<pause>`, EOD and pad ids."""

    def __init__(self, model_proto: bytes, *, source: str = "<memory>"):
        self.had_pause = has_pause_piece(model_proto)  # False: `<pause>` was added here, never trained
        self.model_proto = _with_pause_piece(model_proto)
        self.source = source
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.pause_id = self.sp.piece_to_id(PAUSE_PIECE)
        self.eod_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        if self.eod_id < 0:
            raise TokenizerMismatch(f"{source}: the SentencePiece model has no </s> (EOD) piece")
        if self.pad_id < 0:  # models trained without a pad piece use EOD for padding (always masked)
            self.pad_id = self.eod_id

    @classmethod
    def load(cls, path: str) -> "PauseTokenizer":
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        """Pieces including `<pause>` (before padding for TP)."""
        return self.sp.get_piece_size()

    @property
    def lossless(self) -> bool:
        """Whether text decodes back exactly (identity normalization, whitespace kept)."""
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        spec = proto.normalizer_spec
        return spec.name == "identity" and not spec.remove_extra_whitespaces

    @property
    def checksum(self) -> str:
        """sha256 of the serialized model, `<pause>` included: what manifests and checkpoints record."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def piece_id(self, piece: str) -> int:
        """The id of a piece; raises if the piece is unknown."""
        pid = self.sp.piece_to_id(piece)
        if pid == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise KeyError(f"{self.source}: no piece {piece!r} in the tokenizer")
        return pid

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as lm-eval scores a causal model's pair (TemplateLM._encode_pair).

        The context's trailing whitespace moves to the continuation, the two are encoded together and the
        continuation is what follows the context's own encoding. Encoding " answer" alone would instead start
        with a lone dummy-prefix piece. Finetuning targets and evaluation both use this, so the tokens a model
        is trained on after its pauses are the tokens it is scored on (or must generate).
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = self.encode(context)
        return context_ids, self.encode(context + continuation)[len(context_ids):]

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; `<pause>`, EOD and pad decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def require_pause(self, *, why: str) -> None:
        """A model's tokenizer must already have `<pause>` (a trained or at least allocated embedding)."""
        if not self.had_pause:
            raise TokenizerMismatch(f"{self.source}: the tokenizer has no <pause> piece, but {why}")

    def ids(self) -> dict[str, int]:
        """The special ids, as recorded in manifests and checkpoints."""
        return {"pause_id": self.pause_id, "eod_id": self.eod_id, "pad_id": self.pad_id, "vocab_size": self.vocab_size}

    def check_matches(self, record: dict, *, where: str) -> None:
        """Raise TokenizerMismatch unless `record` (a manifest or checkpoint) was made with this tokenizer."""
        want = record.get("tokenizer_sha256")
        if want is not None and want != self.checksum:
            raise TokenizerMismatch(
                f"{where}: tokenizer checksum {want[:12]}… does not match the loaded tokenizer "
                f"{self.source} ({self.checksum[:12]}…)"
            )
        pid = record.get("pause_id")
        if pid is not None and pid != self.pause_id:
            raise TokenizerMismatch(
                f"{where}: pause_id {pid} does not match the loaded tokenizer's <pause> id {self.pause_id} ({self.source})"
            )


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 1_000_000,
    seed: int = 0,
    seed_sentencepiece_size: Optional[int] = None,
) -> PauseTokenizer:
    """Train a lossless SentencePiece model on `texts`; `<pause>` is added as the last piece.

    unk=0, bos=1, eos=2 (EOD), pad=3. `texts` may be any iterable of sentences (SentencePiece skips ones over
    4192 bytes: pass lines, not whole web documents). Identity normalization with whitespace kept and byte
    fallback: every text decodes back to itself exactly (C4's newlines included). The same texts, size and
    seed give the same model (threads are fixed at TRAIN_THREADS: the model depends on the thread count).
    """
    texts = texts if isinstance(texts, list) else list(texts)
    if not any(t and not t.isspace() for t in texts):  # SentencePiece's own error: "!sentences_.empty()"
        raise TokenizerTrainingError("no text to train the tokenizer on: every sentence of the sample is empty")
    out = io.BytesIO()
    extra = {} if seed_sentencepiece_size is None else {"seed_sentencepiece_size": seed_sentencepiece_size}
    spm.set_random_generator_seed(seed)  # SentencePiece samples and shuffles its sentences
    try:
        _train(texts, out, vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
               input_sentence_size=input_sentence_size, extra=extra)
    except RuntimeError as exc:
        if "required_chars" not in str(exc):
            raise
        # SentencePiece says "<vocab_size> vs <required>"; the distinct characters plus the 4 special and
        # BYTE_PIECES byte pieces are an upper bound should its wording change.
        said = re.search(r"(\d+) vs (\d+)", str(exc))
        needed = int(said.group(2)) if said else len({c for t in texts for c in t}) + 4 + BYTE_PIECES
        raise TokenizerTrainingError(
            f"vocab_size={vocab_size} is too small for this sample: its characters, the 4 special pieces and the "
            f"{BYTE_PIECES} byte-fallback pieces need {needed}; use a vocab size of at least {needed} (more leaves "
            "room for subwords)") from None
    return PauseTokenizer(out.getvalue())


BYTE_PIECES = 256  # byte_fallback adds one piece per byte value


def _train(texts: list[str], out: io.BytesIO, *, vocab_size: int, model_type: str, character_coverage: float,
           input_sentence_size: int, extra: dict) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=TRAIN_THREADS,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece=PAD_PIECE,
        hard_vocab_limit=False,
        byte_fallback=True,  # any UTF-8 round-trips, even characters unseen in the sample
        minloglevel=2,
        **extra,
    )
