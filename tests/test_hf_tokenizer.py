"""Hugging Face tokenizer.json models (byte-level BPE) behind the tokenizer interface: `<pause>` added, EOD/pad
from the model's own special tokens, data prep, pretraining, finetuning and evaluation with it, and mismatches
between shards and a model's tokenizer refused. The BPE is trained here with the `tokenizers` library."""

import json
import os

import numpy as np
import pytest

from conftest import TINY_SEQ
from helpers import ROOT, python, torchrun

BPE_MERGES = 400  # "a few hundred merges": subwords of the sample's words, a vocabulary far below 32k
# The eos is the model's second special token and pad its third: read from tokenizer_config.json, not guessed
SPECIALS = ["<|im_start|>", "<|endoftext|>", "<|pad|>"]
EOS, PAD = SPECIALS[1], SPECIALS[2]
SAMPLES = str(ROOT / "pause_megatron" / "sample_tasks")


def bpe_tokenizer_json(texts: list[str]) -> str:
    """A GPT-2-style byte-level BPE (no normalizer, ByteLevel pre-tokenizer and decoder) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(SPECIALS) + BPE_MERGES, special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def write_hf_tokenizer(folder, tokenizer_json: str, config: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": EOS, "pad_token": {"content": PAD}} if config is None else config, f)
    return str(folder)


@pytest.fixture(scope="module")
def c4_json(tmp_path_factory):
    from data_prep.c4_sample import write_c4_sample

    folder = tmp_path_factory.mktemp("bpe_c4") / "json"
    write_c4_sample(str(folder), num_files=2, docs_per_file=40, seed=3)
    return folder


@pytest.fixture(scope="module")
def bpe_json(c4_json) -> str:
    from data_prep.c4_input import InputReport, read_c4_file

    texts = [t for p in sorted(c4_json.iterdir()) for t in read_c4_file(str(p), report=InputReport(where=str(p)))]
    return bpe_tokenizer_json(texts)


@pytest.fixture(scope="module")
def bpe_dir(bpe_json, tmp_path_factory) -> str:
    return write_hf_tokenizer(tmp_path_factory.mktemp("bpe") / "model", bpe_json)


BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def llama_dir(bpe_json, tmp_path_factory) -> str:
    """The BPE made Llama-3-style: a BOS special token its post-processor puts before every sequence."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(bpe_json)
    tok.add_special_tokens([BOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return write_hf_tokenizer(tmp_path_factory.mktemp("llama") / "model", tok.to_str())


@pytest.fixture(scope="module")
def sp_model(corpus_texts, tmp_path_factory) -> str:
    from pause_megatron.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    train_tokenizer(corpus_texts, vocab_size=400).save(path)
    return path


def texts_to_round_trip(corpus_texts) -> list[str]:
    return corpus_texts[:50] + ["  two  spaces\nnew line\n\n end ", " leading", "trailing ", "", "日本 🙂 Zürich\t—",
                                "a literal <pause> and <|endoftext|> in a document"]


# ---- the tokenizer ---------------------------------------------------------------------------------------


def test_bpe_with_pause_added_round_trips_text_and_keeps_pause_one_token(bpe_dir, bpe_json, corpus_texts):
    from tokenizers import Tokenizer

    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.tokenizer import HFTokenizer, padded_vocab_size

    original = Tokenizer.from_str(bpe_json)
    tok = tokenizers.load(bpe_dir)
    assert isinstance(tok, HFTokenizer) and tok.kind == "huggingface" and not tok.had_pause and tok.lossless
    # one new id at the end; the embedding grows by one row, padded as the project pads
    assert tok.pause_id == original.get_vocab_size() and tok.vocab_size == original.get_vocab_size() + 1
    assert padded_vocab_size(tok.vocab_size) % 128 == 0 and padded_vocab_size(tok.vocab_size) >= tok.vocab_size
    for text in texts_to_round_trip(corpus_texts):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == original.encode(text, add_special_tokens=False).ids or "<" in text  # ids of the model itself
        assert tok.pause_id not in ids and tok.eod_id not in ids  # no text encodes to a special token
    context, target = tok.encode_pair("Question: where? Answer:", " rivers")
    paused = context + [tok.pause_id] * 3 + target
    assert paused.count(tok.pause_id) == 3  # one id per pause, and it decodes to nothing
    assert tok.decode(paused) == "Question: where? Answer: rivers"
    literal = tok.encode("think <pause> then speak")
    assert tok.pause_id not in literal and len(literal) > 4 and tok.decode(literal) == "think <pause> then speak"


def test_eod_and_pad_are_the_models_own_special_tokens(bpe_dir, bpe_json, tmp_path):
    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.tokenizer import TokenizerMismatch

    tok = tokenizers.load(os.path.join(bpe_dir, "tokenizer.json"))  # the file or its directory: the same
    assert (tok.eod_id, tok.pad_id) == (SPECIALS.index(EOS), SPECIALS.index(PAD))
    assert tok.ids() == tokenizers.load(bpe_dir).ids()
    # config.json's eos_token_id, no pad: pad falls back to EOD (padding is always masked)
    only_config = write_hf_tokenizer(tmp_path / "config_only", bpe_json, config={})
    os.remove(os.path.join(only_config, "tokenizer_config.json"))
    with open(os.path.join(only_config, "config.json"), "w") as f:
        json.dump({"eos_token_id": [SPECIALS.index(EOS), 0]}, f)
    assert (tokenizers.load(only_config).eod_id, tokenizers.load(only_config).pad_id) == (1, 1)
    os.remove(os.path.join(only_config, "config.json"))
    with pytest.raises(TokenizerMismatch, match="no eos token"):
        tokenizers.load(only_config)


def test_saved_tokenizer_reloads_as_the_same_tokenizer_with_pause(bpe_dir, tmp_path):
    import pickle

    from pause_megatron import tokenizer as tokenizers

    tok = tokenizers.load(bpe_dir)
    tok.save(str(tmp_path / tok.file_name))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    again = tokenizers.load(str(tmp_path))
    assert again.had_pause and again.checksum == tok.checksum and again.ids() == tok.ids()
    assert pickle.loads(pickle.dumps(tok)).record() == tok.record()  # what data prep's workers receive


def test_a_tokenizer_of_another_kind_or_file_is_refused(bpe_dir, sp_model, bpe_json, tmp_path):
    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.tokenizer import TokenizerMismatch

    bpe, sp = tokenizers.load(bpe_dir), tokenizers.load(sp_model)
    with pytest.raises(TokenizerMismatch, match=r"SentencePiece .*Hugging Face"):
        bpe.check_matches(sp.record(), where="shards")
    with pytest.raises(TokenizerMismatch, match=r"Hugging Face .*SentencePiece"):
        sp.check_matches(bpe.record(), where="checkpoint")
    legacy = {k: v for k, v in sp.record().items() if k != "tokenizer_kind"}  # records from before kinds: SP's
    with pytest.raises(TokenizerMismatch, match="SentencePiece"):
        bpe.check_matches(legacy, where="old checkpoint")
    # the same tokenizer.json with another eos (a base and an instruct model) is another tokenizer
    other_eos = tokenizers.load(write_hf_tokenizer(tmp_path / "instruct", bpe_json, {"eos_token": SPECIALS[0]}))
    with pytest.raises(TokenizerMismatch, match="checksum"):  # the eos is part of the checksum
        other_eos.check_matches(bpe.record(), where="shards")
    with pytest.raises(TokenizerMismatch, match="eod_id"):  # and the ids are compared as well
        other_eos.check_matches({**bpe.record(), "tokenizer_sha256": other_eos.checksum}, where="shards")


@pytest.mark.parametrize("model", ["bpe_dir", "llama_dir"])
def test_export_writes_a_fast_tokenizer_with_our_ids_and_import_reads_it_back(model, request, corpus_texts,
                                                                              tmp_path):
    from transformers import AutoTokenizer

    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.hf import hf_tokenizer

    tok = tokenizers.load(request.getfixturevalue(model))
    assert (tok.bos_id is not None) == (model == "llama_dir")
    hf_tokenizer(tok, str(tmp_path), max_length=TINY_SEQ).save_pretrained(str(tmp_path))
    fast = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts_to_round_trip(corpus_texts)[:-1]:  # how a sequence starts: with the BOS, if any
        assert fast.encode(text) == tok.bos_ids + tok.encode(text)
    assert fast.convert_tokens_to_ids("<pause>") == tok.pause_id
    assert (fast.eos_token_id, fast.pad_token_id) == (tok.eod_id, tok.pad_id)
    back = tokenizers.load(str(tmp_path))  # what import-hf reads from the exported directory
    assert back.had_pause and back.record() == tok.record()


@pytest.mark.slow
def test_import_hf_reads_a_model_directory_with_tokenizer_json_and_adds_pause(bpe_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.tokenizer import padded_vocab_size

    tok = tokenizers.load(bpe_dir)
    hf = tmp_path / "hf"
    # More rows than the padded tokenizer, as Qwen2.5's 151936 for 151665 tokens: the model's size is kept
    rows = padded_vocab_size(tok.vocab_size) + 128
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=rows, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=TINY_SEQ, rotary_pct=1.0, use_parallel_residual=False,
        tie_word_embeddings=False)).save_pretrained(hf, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # no tokenizer.model: a BPE model's directory
        shutil.copy(os.path.join(bpe_dir, name), hf / name)
    proc = python("-m", "pause_megatron.cli", "import-hf", str(hf), str(tmp_path / "ckpt"))
    assert f"model.make_vocab_size_divisible_by={rows}" in proc.stdout  # every later run pads to `rows`
    # a recipe plans its pretrainings (before the import runs) with the import's own model settings
    from pause_megatron import hf as hf_
    from pause_megatron.hf import checkpoint_model_overrides

    assert set(checkpoint_model_overrides(str(tmp_path / "ckpt"))) <= set(hf_.hf_model_overrides(str(hf), TINY_SEQ))
    assert hf_.import_vocab_size(str(hf)) == rows
    assert tokenizers.load(str(tmp_path / "ckpt")).record() == tok.record()  # <pause> added, stored as json
    extra = torch.load(tmp_path / "ckpt" / "iter_0000000" / "common.pt", weights_only=False)["extra"]
    assert {k: extra[k] for k in tok.record()} == tok.record()
    # the model's rows kept, <pause> (the first free row) starts as the mean of the tokenizer's rows; read with
    # torch.distributed.checkpoint's own reader
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "ckpt" / "iter_0000000")
    names = {"embedding.word_embeddings.weight": "gpt_neox.embed_in.weight", "output_layer.weight": "embed_out.weight"}
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    y = {k: torch.empty(meta[k].size) for k in names}
    dcp.load(y, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    y = {names[k]: v for k, v in y.items()}
    x, pieces = load_file(hf / "model.safetensors"), tok.pause_id
    for name in names.values():
        assert y[name].shape == x[name].shape == (rows, 32)
        assert bool((y[name][:pieces] == x[name][:pieces]).all())
        assert bool((y[name][pieces + 1:] == x[name][pieces + 1:]).all())
        assert torch.allclose(y[name][pieces], x[name][:pieces].mean(0))


# ---- data prep, pretraining, finetuning, evaluation -----------------------------------------------------


def build(c4_json, out, tokenizer: str) -> int:
    from data_prep import build_c4

    return build_c4.main(["build", "--input", str(c4_json), "--output", str(out), "--tokenizer", tokenizer,
                          "--seq-length", str(TINY_SEQ), "--workers", "2"])


@pytest.fixture(scope="module")
def bpe_shards(c4_json, bpe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_shards") / "out"
    assert build(c4_json, out, bpe_dir) == 0
    return out


def test_data_prep_with_a_bpe_writes_shards_megatron_reads_and_records_the_kind(bpe_shards, bpe_dir, c4_json):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.c4_input import InputReport, read_c4_file
    from data_prep.validate import validate
    from pause_megatron import tokenizer as tokenizers

    tok = tokenizers.load(bpe_dir)
    manifest = json.loads((bpe_shards / "manifest.json").read_text())
    assert manifest["tokenizer_kind"] == "huggingface" and manifest["tokenizer_sha256"] == tok.checksum
    assert manifest["tokenizer_source"] == {"given": os.path.abspath(bpe_dir)}
    assert (manifest["eod_id"], manifest["pad_id"], manifest["pause_id"]) == (tok.eod_id, tok.pad_id, tok.pause_id)
    assert tokenizers.load(str(bpe_shards)).record() == tok.record()  # stored as tokenizer.json
    assert not (bpe_shards / "tokenizer.model").exists()
    assert validate(str(bpe_shards))["errors"] == []
    for path in sorted(c4_json.iterdir()):
        name = path.name[: -len(".json.gz")]
        std = IndexedDataset(str(bpe_shards / "std" / name))  # megatron-core's own reader
        stream = np.concatenate([std[i] for i in range(len(std))])
        docs = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.eod_id))[:-1]]
        assert docs == list(read_c4_file(str(path), report=InputReport(where=str(path))))  # lossless, EOD each
        pause = IndexedDataset(str(bpe_shards / "pause" / name))
        assert sum(int((pause[i] == tok.pause_id).sum()) for i in range(len(pause))) == sum(
            r["pauses"] for r in manifest["shards"] if r["name"] == name) > 0


@pytest.fixture(scope="module")
def bpe_pretrained(bpe_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_pretrained")
    torchrun("-m pause_megatron.pretrain", f"data.path={bpe_shards}", f"train.output_dir={out}", "model.preset=tiny",
             "train.steps=2", "optim.warmup_steps=0", "train.global_batch_size=4", "train.micro_batch_size=2",
             "tracking.enabled=false")
    return out / "checkpoints"


@pytest.mark.slow
def test_pretraining_on_bpe_shards_stores_the_bpe_with_the_checkpoint(bpe_pretrained, bpe_shards, bpe_dir):
    from pause_megatron import tokenizer as tokenizers

    tok = tokenizers.load(bpe_dir)
    assert sorted(p.name for p in bpe_pretrained.iterdir() if p.name.startswith("token")) == [
        "tokenizer.json", "tokenizer_config.json"]
    assert tokenizers.load(str(bpe_pretrained)).record() == tok.record()
    assert (bpe_pretrained / "iter_0000002").is_dir()


@pytest.mark.slow
def test_finetuning_and_evaluation_load_the_checkpoints_bpe(bpe_pretrained, bpe_dir):
    from pause_megatron import checkpoint
    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.config import load_config
    from pause_megatron.finetune import build_datasets

    # finetuning: the tokenizer that pause_megatron.finetune loads from the checkpoint builds its examples
    tok = tokenizers.load(checkpoint.tokenizer_path(str(bpe_pretrained / "iter_0000002")))
    assert tok.record() == tokenizers.load(bpe_dir).record()
    cfg = load_config("recipes/finetune.yaml", ["task=lambada", f"data.task_dir={SAMPLES}",
                                                f"model.seq_length={TINY_SEQ}", "pauses.m_ft=2"], hardware=False)
    train, _ = build_datasets(cfg, tok)
    assert len(train) > 0 and int((np.asarray(train[0]["tokens"]) == tok.pause_id).sum()) == 2
    # evaluation: the whole path (checkpoint, BPE, lm-eval adapter, generation) on one squad prompt
    proc = python("-m", "pause_megatron.evaluate", "--checkpoint", str(bpe_pretrained), "--tasks", "squad",
                  "--data-dir", SAMPLES, "--limit", "1", "tracking.enabled=false")
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"checkpoint"')][-1])
    assert 0.0 <= report["scores"]["squad"]["exact_match"] <= 1.0


@pytest.mark.slow
def test_shards_of_one_kind_and_a_model_of_the_other_are_refused(bpe_shards, bpe_pretrained, sp_model, c4_json,
                                                                 tmp_path):
    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.config import load_config
    from pause_megatron.data import check_manifest, read_manifest
    from pause_megatron.tokenizer import TokenizerMismatch

    # BPE shards read with a SentencePiece tokenizer (what data.tokenizer=... gives pretraining)
    cfg = load_config(None, [f"data.path={bpe_shards}", f"model.seq_length={TINY_SEQ}"], hardware=False)
    with pytest.raises(TokenizerMismatch, match="Hugging Face"):
        check_manifest(read_manifest(str(bpe_shards)), cfg=cfg, tokenizer=tokenizers.load(sp_model), where="x")
    # SentencePiece shards and a model pretrained with the BPE: refused before anything is written
    sp_shards = tmp_path / "sp_shards"
    assert build(c4_json, sp_shards, sp_model) == 0
    out = tmp_path / "run"
    proc = torchrun("-m pause_megatron.pretrain", f"data.path={sp_shards}", f"train.output_dir={out}",
                    "model.preset=tiny", f"train.init_from={bpe_pretrained}", "train.steps=1",
                    "optim.warmup_steps=0", "tracking.enabled=false", check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the rank exits 2; torchrun reports a failure
    assert "made with a Hugging Face (tokenizer.json) tokenizer" in proc.stderr
    assert not out.exists()  # nothing written: neither checkpoints nor the datasets' index cache


# ---- the tokenizer's identity, its BOS, and what a tokenizer.json may not decide -------------------------


def test_identity_is_the_content_with_eos_and_pad_not_the_bytes_of_the_file(bpe_dir, bpe_json, tmp_path):
    from data_prep import manifest as mf
    from pause_megatron import tokenizer as tokenizers

    tok = tokenizers.load(bpe_dir)
    spec = json.loads(bpe_json)
    pretty = tokenizers.load(write_hf_tokenizer(tmp_path / "pretty", json.dumps(spec, indent=4)))
    compact = tokenizers.load(write_hf_tokenizer(tmp_path / "compact", json.dumps(spec, separators=(",", ":"))))
    assert pretty.checksum == compact.checksum == tok.checksum
    # another serializer's formatting of the same content (another `tokenizers` release): the same checksum
    pretty.serialized = json.dumps(json.loads(tok.serialized), indent=2, sort_keys=True).encode()
    assert pretty.serialized != tok.serialized and pretty.checksum == tok.checksum
    # the same tokenizer.json with another eos (a base and an instruct model) is another tokenizer
    other = tokenizers.load(write_hf_tokenizer(tmp_path / "instruct", bpe_json, {"eos_token": SPECIALS[0]}))
    assert other.checksum != tok.checksum
    # what a data-prep rerun compares: the kind and the special ids too; an old manifest is SentencePiece's
    record = tok.record()
    assert mf.config_differences(record, {**record, "eod_id": 0}) == ["eod_id: 1 -> 0"]
    assert mf.config_differences(record, {**record, "pad_id": 0}) == ["pad_id: 2 -> 0"]
    assert mf.config_differences(record, {**record, "bos_id": 7}) == ["bos_id: None -> 7"]
    old = {k: v for k, v in record.items() if k not in ("tokenizer_kind", "bos_id")}
    assert mf.config_differences(old, {**record, "tokenizer_kind": "sentencepiece"}) == []
    assert mf.config_differences(old, record) == ["tokenizer_kind: 'sentencepiece' -> 'huggingface'"]


def test_a_rerun_with_the_same_tokenizer_json_and_another_eos_is_refused(c4_json, bpe_dir, bpe_json, tmp_path,
                                                                         capsys):
    from data_prep import build_c4

    instruct = write_hf_tokenizer(tmp_path / "instruct", bpe_json, {"eos_token": SPECIALS[0]})
    out = tmp_path / "out"
    args = ["build", "--input", str(c4_json), "--output", str(out), "--seq-length", str(TINY_SEQ), "--workers", "1"]
    assert build_c4.main([*args, "--tokenizer", bpe_dir, "--shard-range", "0:1"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert build_c4.main([*args, "--tokenizer", instruct]) == 2  # refused: EOD would be two ids in one output
    assert "eod_id: 1 -> 0" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_a_bos_post_processor_starts_every_document_prompt_and_context_with_the_bos(llama_dir, c4_json, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.c4_input import InputReport, read_c4_file
    from pause_megatron import tokenizer as tokenizers

    tok = tokenizers.load(llama_dir)
    assert tok.bos_id == tok.piece_id(BOS) and tok.record()["bos_id"] == tok.bos_id
    assert tok.bos_id not in tok.encode("a text")  # encode alone adds nothing
    context, target = tok.encode_pair("Question: where? Answer:", " rivers")  # finetuning's and evaluation's split
    assert context[0] == tok.bos_id and context[1:] == tok.encode("Question: where? Answer:")
    out = tmp_path / "out"
    assert build(c4_json, out, llama_dir) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bos_id"] == tok.bos_id
    path = sorted(c4_json.iterdir())[0]
    std = IndexedDataset(str(out / "std" / path.name[: -len(".json.gz")]))  # megatron-core's own reader
    stream = np.concatenate([std[i] for i in range(len(std))])
    docs = np.split(stream, np.flatnonzero(stream == tok.eod_id) + 1)[:-1]  # each ends with its EOD
    texts = list(read_c4_file(str(path), report=InputReport(where=str(path))))
    assert [d.tolist() for d in docs] == [[tok.bos_id, *tok.encode(t), tok.eod_id] for t in texts]


@pytest.mark.parametrize("model", ["bpe_dir", "llama_dir"])
def test_eval_inputs_equal_lm_evals_hf_backend_tokenization(model, request, tmp_path):
    """lm-eval's HFLM (its own tok_encode, prefix_token_id and _encode_pair, on the exported Hugging Face
    tokenizer) and our adapter turn the same loglikelihood requests into the same token ids."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.evaluate import make_lm
    from pause_megatron.hf import hf_tokenizer

    tok = tokenizers.load(request.getfixturevalue(model))
    hf_tokenizer(tok, str(tmp_path), max_length=TINY_SEQ).save_pretrained(str(tmp_path))
    hflm = HFLM.__new__(HFLM)  # no model: only its tokenization runs
    hflm.tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    hflm.add_bos_token, hflm.custom_prefix_token_id, hflm.backend = None, None, "causal"  # HFLM's defaults
    hflm.enable_thinking = False
    ours = make_lm(None, tok, m_inf=0, placement="none", max_length=TINY_SEQ, device=torch.device("cpu"))
    requests = [Instance("loglikelihood", {}, (c, t), 0) for c, t in [
        ("Question: where do rivers flow? Answer:", " to the sea"), ("The cat sat on the", " mat"),
        ("trailing space ", "next"), ("", "A whole text scored from the start.")]]
    seen = {}
    for name, lm in (("hf", hflm), ("ours", ours)):  # the (context ids, continuation ids) each would score
        lm._loglikelihood_tokens = lambda reqs, *a, _n=name, **k: seen.setdefault(_n, [r[1:] for r in reqs])
        lm.loglikelihood(requests, disable_tqdm=True)
    assert seen["ours"] == seen["hf"]
    if model == "llama_dir":  # every context starts with the BOS, an empty one is the BOS
        assert tok.bos_id is not None and all(context[0] == tok.bos_id for context, _ in seen["ours"])
    assert seen["ours"][-1][0] == [tok.bos_id if model == "llama_dir" else tok.eod_id]


def test_truncation_and_padding_in_the_file_are_not_obeyed(bpe_dir, bpe_json, tmp_path):
    from pause_megatron import tokenizer as tokenizers

    spec = json.loads(bpe_json)
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 2,
                       "pad_type_id": 0, "pad_token": PAD}
    tok, plain = tokenizers.load(write_hf_tokenizer(tmp_path / "cut", json.dumps(spec))), tokenizers.load(bpe_dir)
    text = "The quick brown fox jumps over the lazy dog and keeps running far away"
    assert tok.encode(text) == plain.encode(text) and len(plain.encode(text)) > 4
    assert tok.encode_batch([text, "a"], num_threads=2) == [plain.encode(text), plain.encode("a")]
    assert tok.checksum == plain.checksum


def test_a_pause_that_is_an_added_token_but_not_special_becomes_special(bpe_json, tmp_path):
    from tokenizers import AddedToken, Tokenizer

    from pause_megatron import tokenizer as tokenizers

    raw = Tokenizer.from_str(bpe_json)
    raw.add_tokens([AddedToken("<pause>", special=False)])
    assert raw.encode("think <pause> then", add_special_tokens=False).ids.count(raw.token_to_id("<pause>")) == 1
    tok = tokenizers.load(write_hf_tokenizer(tmp_path / "m", raw.to_str()))
    assert tok.had_pause and tok.pause_id == raw.token_to_id("<pause>") and tok.vocab_size == raw.get_vocab_size()
    ids = tok.encode("think <pause> then")
    assert tok.pause_id not in ids and tok.decode(ids) == "think <pause> then"  # a literal stays text
    assert tok.decode(ids + [tok.pause_id]) == "think <pause> then"  # and the token decodes to nothing


def test_an_unreadable_tokenizer_json_is_refused_naming_the_file(c4_json, bpe_json, tmp_path, capsys):
    from data_prep import build_c4
    from pause_megatron import tokenizer as tokenizers
    from pause_megatron.tokenizer import TokenizerMismatch

    for name, text in (("truncated", bpe_json[: len(bpe_json) // 2]), ("not_a_tokenizer", '{"model": {}}')):
        folder = write_hf_tokenizer(tmp_path / name, text)
        with pytest.raises(TokenizerMismatch, match="not a readable tokenizer.json"):  # what every entry point catches
            tokenizers.load(folder)
        assert build_c4.main(["build", "--input", str(c4_json), "--output", str(tmp_path / "out"),
                              "--tokenizer", folder]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {os.path.join(folder, 'tokenizer.json')}: not a readable")
        assert "Traceback" not in err
