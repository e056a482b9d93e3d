"""Tokenizers with `<pause>`, EOD and pad: SentencePiece (train one on a corpus sample, or load one) and Hugging
Face `tokenizer.json` models (the byte-level BPEs of Llama 3, Qwen2, SmolLM2), behind one interface.

`load(path)` takes a SentencePiece .model, a tokenizer.json, or a directory holding either; every entry point
reads tokenizers through it. `<pause>` is one extra token at the end of the vocabulary (the paper's single new
embedding outside the normal vocabulary) unless the tokenizer has one. No text ever encodes to it — a literal
"<pause>" in C4 stays text — and it decodes to nothing: a CONTROL piece in SentencePiece, a special added token
that encoding never splits out of text in `tokenizers`. EOD is SentencePiece's `</s>` or the Hugging Face
model's eos token; pad is `<pad>` or its pad token, else EOD (padding is always masked).

BOS: a Hugging Face tokenizer whose post-processor puts a BOS before a single sequence (Llama 3's
`<|begin_of_text|>`) was trained with it at position 0, and lm-eval's Hugging Face backend adds it to every
context. So wherever such a tokenizer begins a sequence, it begins with the BOS (`bos_ids`): every document in
data prep (BOS + tokens + EOD), every finetuning prompt and evaluation context (`encode_pair`). `encode` itself
never adds it. SentencePiece models (and tokenizer.json models without such a post-processor) have no BOS.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from typing import Iterable, Optional

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as model_pb2

TRAIN_THREADS = 16  # SentencePiece's trained model depends on its thread count: fixed, for reproducibility
PAUSE_PIECE = "<pause>"
PAD_PIECE = "<pad>"
DEFAULT_VOCAB_SIZE = 32000  # the paper's models use a 32k SentencePiece vocabulary (T5-style)
SENTENCEPIECE, HUGGINGFACE = "sentencepiece", "huggingface"  # the kinds, as manifests and checkpoints record them
KIND_NAMES = {SENTENCEPIECE: "SentencePiece (tokenizer.model)", HUGGINGFACE: "Hugging Face (tokenizer.json)"}
HF_CONFIG_FILE = "tokenizer_config.json"  # beside a tokenizer.json: its eos and pad tokens (Hugging Face's file)


class TokenizerTrainingError(ValueError):
    """SentencePiece cannot train on this input with these settings; the message says why and what to change."""


class TokenizerMismatch(ValueError):
    """Data or a checkpoint was made with a different tokenizer than the one loaded."""


class UnreadableTokenizer(TokenizerMismatch):
    """A tokenizer file that cannot be used (caught wherever a mismatch is: every entry point names the file)."""


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


class BaseTokenizer:
    """What every tokenizer kind shares: the special ids, the pair split, and the checks against records.

    A kind defines `kind`, `file_name` (what `save` writes in a directory), `serialized` (the saved bytes, which
    the checksum hashes), pause_id, eod_id, pad_id, had_pause, source, vocab_size, lossless, checksum,
    piece_id, encode, encode_batch, decode, save, and pickling (data prep's worker processes).
    """

    kind: str
    file_name: str
    bos_id: Optional[int] = None  # what every sequence starts with (see the module's docstring); None: nothing

    @property
    def bos_ids(self) -> list[int]:
        """The ids before a sequence's own: [bos_id], or none."""
        return [] if self.bos_id is None else [self.bos_id]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as lm-eval scores a causal model's pair (TemplateLM._encode_pair).

        The context's trailing whitespace moves to the continuation, the two are encoded together and the
        continuation is what follows the context's own encoding. Encoding " answer" alone would instead start
        with a lone dummy-prefix piece. Finetuning targets and evaluation both use this, so the tokens a model
        is trained on after its pauses are the tokens it is scored on (or must generate). The context starts
        with the BOS when the tokenizer has one (as lm-eval's Hugging Face backend encodes it).
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = self.encode(context)
        return self.bos_ids + context_ids, self.encode(context + continuation)[len(context_ids):]

    def require_pause(self, *, why: str) -> None:
        """A model's tokenizer must already have `<pause>` (a trained or at least allocated embedding)."""
        if not self.had_pause:
            raise TokenizerMismatch(f"{self.source}: the tokenizer has no <pause> piece, but {why}")

    def ids(self) -> dict[str, int]:
        """The special ids, as recorded in manifests and checkpoints."""
        return {"pause_id": self.pause_id, "eod_id": self.eod_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "vocab_size": self.vocab_size}

    def record(self) -> dict:
        """What manifests and checkpoints record of their tokenizer: its kind, checksum and special ids."""
        return {"tokenizer_kind": self.kind, "tokenizer_sha256": self.checksum, **self.ids()}

    def check_matches(self, record: dict, *, where: str) -> None:
        """Raise TokenizerMismatch unless `record` (a manifest or checkpoint) was made with this tokenizer."""
        kind = record.get("tokenizer_kind", SENTENCEPIECE if "tokenizer_sha256" in record else None)
        if kind is not None and kind != self.kind:  # records from before kinds existed are SentencePiece's
            raise TokenizerMismatch(
                f"{where}: made with a {KIND_NAMES.get(kind, kind)} tokenizer, but the loaded tokenizer {self.source} "
                f"is a {KIND_NAMES[self.kind]} one; use the tokenizer the data and the model were made with")
        want = record.get("tokenizer_sha256")
        if want is not None and want != self.checksum:
            raise TokenizerMismatch(
                f"{where}: tokenizer checksum {want[:12]}… does not match the loaded tokenizer "
                f"{self.source} ({self.checksum[:12]}…)"
            )
        for key, have in self.ids().items():  # same file, other special tokens (a base and an instruct model)
            if key == "vocab_size" or (record.get(key) is None and key != "bos_id"):
                continue
            if record.get(key) != have:  # a record without bos_id is from before BOS existed: it had none
                raise TokenizerMismatch(f"{where}: {key} {record.get(key)} does not match the loaded tokenizer's "
                                        f"{have} ({self.source})")


class PauseTokenizer(BaseTokenizer):
    """A SentencePiece model that is guaranteed to have `<pause>`, EOD and pad ids."""

    kind = SENTENCEPIECE
    file_name = "tokenizer.model"

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
            data = f.read()
        try:
            return cls(data, source=path)
        except (RuntimeError, DecodeError) as exc:  # not a SentencePiece model
            raise UnreadableTokenizer(f"{path}: not a readable SentencePiece model ({exc})") from None

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

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; `<pause>`, EOD and pad decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    @property
    def serialized(self) -> bytes:
        return self.model_proto

    def __reduce__(self):  # pickled as its model (data prep's worker processes)
        return _rebuild_sentencepiece, (self.model_proto, self.source)


class HFTokenizer(BaseTokenizer):
    """A Hugging Face `tokenizers` model (tokenizer.json) that is guaranteed to have `<pause>`, EOD and pad ids.

    `<pause>` is added as a special token when missing (one new id at the end). Encoding never splits special
    tokens out of text (`encode_special_tokens`), so a literal "<pause>" or "<|endoftext|>" in a document stays
    text, as SentencePiece's control pieces do; `encode` adds no BOS or template (`add_special_tokens=False`):
    the BOS of a post-processor is `bos_id`, put where sequences begin (see the module's docstring). EOD and pad
    are the model's own eos and pad tokens, read from the files beside tokenizer.json.
    """

    kind = HUGGINGFACE
    file_name = "tokenizer.json"

    def __init__(self, tokenizer_json: bytes, *, eos_token: str, pad_token: Optional[str], source: str = "<memory>"):
        from tokenizers import AddedToken, Tokenizer

        try:
            spec = json.loads(tokenizer_json)
            added = [t for t in spec.get("added_tokens") or [] if t["content"] == PAUSE_PIECE]
            for token in added:  # an added <pause> that is not special would be split out of text
                token["special"] = True
            self.tk = Tokenizer.from_str(json.dumps(spec))
        except Exception as exc:  # JSON or the `tokenizers` library's own error (a bare Exception)
            raise UnreadableTokenizer(f"{source}: not a readable tokenizer.json ({type(exc).__name__}: {exc})") \
                from None
        self.had_pause = bool(added)
        self.source = source
        if not added and self.tk.token_to_id(PAUSE_PIECE) is not None:
            raise TokenizerMismatch(f"{source}: <pause> is an ordinary token of this tokenizer (text encodes to it); "
                                    "the pause token must be a special token of its own")
        if not added:
            before = self._next_id()
            self.tk.add_special_tokens([AddedToken(PAUSE_PIECE, special=True, normalized=False)])
            if self.tk.token_to_id(PAUSE_PIECE) != before:
                raise TokenizerMismatch(f"{source}: <pause> was given id {self.tk.token_to_id(PAUSE_PIECE)}, not the "
                                        f"next free id {before}")
        # A model's file may ask to cut or pad every encoding to a length: documents are never cut, nor padded.
        self.tk.no_truncation()
        self.tk.no_padding()
        self.tk.encode_special_tokens = True  # not part of the serialized form: set on every load
        self.serialized = self.tk.to_str().encode()
        self.eos_token, self.pad_token = eos_token, pad_token or eos_token
        self.pause_id = self.tk.token_to_id(PAUSE_PIECE)
        self.eod_id = self._special_id(self.eos_token, "eos")
        self.pad_id = self._special_id(self.pad_token, "pad")
        self.bos_id = self._post_processor_bos()

    def _post_processor_bos(self) -> Optional[int]:
        """The one id the post-processor puts before a single sequence (Llama 3's BOS), or None."""
        plain = self.tk.encode("a", add_special_tokens=False).ids
        full = self.tk.encode("a", add_special_tokens=True).ids
        if full == plain:
            return None
        if len(full) == len(plain) + 1 and full[1:] == plain:
            return full[0]
        raise TokenizerMismatch(
            f"{self.source}: its post-processor turns a sequence {plain} into {full}; only a single BOS before it is "
            "supported (the project adds EOD after each document itself)")

    def __reduce__(self):  # pickled as its tokenizer.json and special tokens
        return _rebuild_hf, (self.serialized, self.eos_token, self.pad_token, self.source)

    def _next_id(self) -> int:
        return max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _special_id(self, token: str, role: str) -> int:
        tid = self.tk.token_to_id(token)
        if tid is None:
            raise TokenizerMismatch(f"{self.source}: the {role} token {token!r} is not in the tokenizer")
        return tid

    @classmethod
    def load(cls, path: str) -> "HFTokenizer":
        """A tokenizer.json, with eos/pad from the Hugging Face files beside it (see `special_tokens`)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        try:
            json.loads(data)
        except ValueError as exc:
            raise UnreadableTokenizer(f"{path}: not a readable tokenizer.json ({exc})") from None
        eos, pad = special_tokens(os.path.dirname(os.path.abspath(path)), data)
        return cls(data, eos_token=eos, pad_token=pad, source=path)

    def save(self, path: str) -> None:
        """tokenizer.json at `path`, and its eos/pad tokens in tokenizer_config.json beside it."""
        config = os.path.join(os.path.dirname(os.path.abspath(path)), HF_CONFIG_FILE)
        for target, data in ((config, json.dumps(self.config(), indent=1).encode()), (path, self.serialized)):
            with open(f"{target}.tmp", "wb") as f:
                f.write(data)
            os.replace(f"{target}.tmp", target)

    def config(self) -> dict:
        """tokenizer_config.json's content: what a reader needs beyond tokenizer.json (and transformers' class)."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token, "pad_token": self.pad_token}

    @property
    def vocab_size(self) -> int:
        """Tokens including `<pause>` (the highest id + 1, before padding for TP)."""
        return self._next_id()

    @property
    def lossless(self) -> bool:
        """Whether text decodes back exactly: byte-level pre-tokenizer and decoder, no normalizer, no added prefix."""
        spec = json.loads(self.serialized)
        pre = spec.get("pre_tokenizer") or {}
        levels = [p for p in pre.get("pretokenizers", [pre]) if p and p.get("type") == "ByteLevel"]
        return (spec.get("normalizer") is None and bool(levels) and not any(p.get("add_prefix_space") for p in levels)
                and (spec.get("decoder") or {}).get("type") == "ByteLevel")

    @property
    def checksum(self) -> str:
        """sha256 of the tokenizer's identity: what manifests and checkpoints record.

        A canonical form (sorted keys, no whitespace) of the tokenizer.json as `tokenizers` reads it, `<pause>`
        included, and the eos and pad tokens: the same file with another eos (a base and an instruct model) is
        another tokenizer, and the same tokenizer written pretty-printed or compact is the same one.
        """
        identity = {"tokenizer": json.loads(self.serialized), "eos_token": self.eos_token, "pad_token": self.pad_token}
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def piece_id(self, piece: str) -> int:
        tid = self.tk.token_to_id(piece)
        if tid is None:
            raise KeyError(f"{self.source}: no token {piece!r} in the tokenizer")
        return tid

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, num_threads: int = 1) -> list[list[int]]:
        """num_threads=1 encodes in this thread (data prep's workers are the parallelism); more: tokenizers' pool."""
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; `<pause>`, EOD and pad (special tokens) decode to nothing."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


def _rebuild_sentencepiece(model_proto: bytes, source: str) -> PauseTokenizer:
    return PauseTokenizer(model_proto, source=source)


def _rebuild_hf(tokenizer_json: bytes, eos_token: str, pad_token: str, source: str) -> HFTokenizer:
    return HFTokenizer(tokenizer_json, eos_token=eos_token, pad_token=pad_token, source=source)


def _token_content(value) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except ValueError as exc:
        raise UnreadableTokenizer(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(c, dict):
        raise UnreadableTokenizer(f"{path}: not a JSON object")
    return c


def special_tokens(directory: str, tokenizer_json: bytes) -> tuple[str, Optional[str]]:
    """(eos, pad) of a Hugging Face tokenizer: tokenizer_config.json, else special_tokens_map.json, else
    config.json's eos_token_id / pad_token_id (the first eos when it lists several). pad may be None."""
    for name in (HF_CONFIG_FILE, "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            c = _read_json(path)
            if _token_content(c.get("eos_token")):
                return _token_content(c["eos_token"]), _token_content(c.get("pad_token"))
    path = os.path.join(directory, "config.json")
    if os.path.exists(path):
        c = _read_json(path)
        by_id = {t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens") or []}
        eos, pad = c.get("eos_token_id"), c.get("pad_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        if eos in by_id:
            return by_id[eos], by_id.get(pad)
    raise TokenizerMismatch(f"{directory}: no eos token for its tokenizer.json: give the directory with the model's "
                            f"{HF_CONFIG_FILE} (eos_token, pad_token) or config.json (eos_token_id)")


TOKENIZER_FILES = (PauseTokenizer.file_name, HFTokenizer.file_name)  # what `load` looks for in a directory


def tokenizer_file(directory: str) -> Optional[str]:
    """The tokenizer file in `directory` (a SentencePiece model first: Hugging Face directories of SentencePiece
    models carry a converted tokenizer.json beside it), or None."""
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load(path: str) -> BaseTokenizer:
    """The tokenizer at `path`: a SentencePiece .model, a tokenizer.json, or a directory holding either."""
    if os.path.isdir(path):
        found = tokenizer_file(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(TOKENIZER_FILES)} in the directory")
        path = found
    if path.endswith(".json"):
        return HFTokenizer.load(path)
    return PauseTokenizer.load(path)


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
