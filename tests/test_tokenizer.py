"""SentencePiece with <pause>, EOD and pad (pause_megatron.tokenizer)."""

import io

import pytest
import sentencepiece as spm

from pause_megatron.tokenizer import (
    PAUSE_PIECE,
    PauseTokenizer,
    TokenizerMismatch,
    padded_vocab_size,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok(corpus_texts):
    return train_tokenizer(corpus_texts, vocab_size=400)


def test_pause_is_one_new_piece_at_the_end(tok):
    assert tok.pause_id == tok.vocab_size - 1
    assert tok.sp.id_to_piece(tok.pause_id) == PAUSE_PIECE
    assert len({tok.pause_id, tok.eod_id, tok.pad_id, tok.sp.unk_id()}) == 4


def test_text_round_trips_and_special_ids_decode_to_nothing(tok, corpus_texts):
    text = corpus_texts[3]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.pause_id] + ids + [tok.pause_id, tok.eod_id, tok.pad_id]) == text


def test_literal_pause_text_never_becomes_the_pause_token(tok):
    ids = tok.encode("look: <pause> here")
    assert tok.pause_id not in ids
    assert tok.decode(ids) == "look: <pause> here"


def test_unseen_characters_round_trip_through_byte_fallback(tok):
    assert tok.decode(tok.encode("日本語 ✓")) == "日本語 ✓"


def test_batch_encoding_equals_single(tok, corpus_texts):
    assert tok.encode_batch(corpus_texts[:5], num_threads=2) == [tok.encode(t) for t in corpus_texts[:5]]


def test_loading_a_model_without_pause_adds_it(tmp_path, corpus_texts):
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts), model_writer=out, vocab_size=300,
                                   hard_vocab_limit=False, minloglevel=2)
    plain = spm.SentencePieceProcessor(model_proto=out.getvalue())
    path = tmp_path / "plain.model"
    path.write_bytes(out.getvalue())
    tok = PauseTokenizer.load(str(path))
    assert tok.vocab_size == plain.get_piece_size() + 1
    assert tok.pause_id == plain.get_piece_size()
    assert tok.pad_id == tok.eod_id  # no pad piece in that model: EOD pads (always masked)
    # Existing ids do not move, and saving + loading again is stable.
    assert tok.encode("the river") == plain.encode("the river")
    tok.save(str(tmp_path / "with_pause.model"))
    again = PauseTokenizer.load(str(tmp_path / "with_pause.model"))
    assert again.checksum == tok.checksum and again.pause_id == tok.pause_id


def test_manifest_mismatch_is_a_clear_error(tok):
    tok.check_matches({"tokenizer_sha256": tok.checksum, "pause_id": tok.pause_id}, where="manifest.json")
    with pytest.raises(TokenizerMismatch, match="manifest.json: tokenizer checksum"):
        tok.check_matches({"tokenizer_sha256": "0" * 64}, where="manifest.json")
    with pytest.raises(TokenizerMismatch, match="pause_id 5 does not match"):
        tok.check_matches({"pause_id": 5}, where="ckpt/meta")


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        PauseTokenizer.load(str(tmp_path / "nope.model"))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_is_divisible_by_tp_and_the_same_for_every_tp(tp):
    assert padded_vocab_size(32001, tensor_parallel=tp) == 32128
    assert padded_vocab_size(32001, tensor_parallel=tp) % tp == 0
    assert padded_vocab_size(128) == 128
    assert padded_vocab_size(100, tensor_parallel=3) % 3 == 0
