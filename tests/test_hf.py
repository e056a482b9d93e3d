"""Hugging Face export and import (pause_megatron.hf), checked against transformers' own GPT-NeoX and lm-eval's
own `hf` backend: implementations this project did not write."""

import json
import os
import random

import pytest

from helpers import ROOT, python, torchrun

pytestmark = pytest.mark.slow

SAMPLES = str(ROOT / "pause_megatron" / "sample_tasks")
# fp32 logits (size ~3) of the tiny model: transformers' GPT-NeoX gives Megatron's bit for bit here (difference
# 0.0); 1e-5 leaves room for another BLAS or thread count (fp32 rounding over 4 layers of 64-256-wide sums is
# ~1e-6). Swapping the tanh approximation of GELU for exact GELU alone moves them by ~1e-4 (`other_gelu_diff`);
# a permuted QKV or a missing bias by O(1).
LOGIT_ATOL = 1e-5


def cli(*args, check=True):
    return python("-m", "pause_megatron.cli", *map(str, args), check=check)


@pytest.fixture(scope="module")
def tp2pp2(pretrained, tiny_c4, tmp_path_factory):
    """The tiny pretrained model trained 1 more step and saved at TP=2 x PP=2 (both resharded dimensions)."""
    out = tmp_path_factory.mktemp("tp2pp2")
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={out}", "model.preset=tiny",
             f"train.init_from={pretrained}", "parallel.tensor=2", "parallel.pipeline=2", "train.steps=1",
             "optim.warmup_steps=0", "train.global_batch_size=4", "train.micro_batch_size=2",
             "tracking.enabled=false", nproc=4)
    return out / "checkpoints"


@pytest.fixture(scope="module")
def exported(tp2pp2, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    cli("export-hf", tp2pp2, out)
    return out


def check(checkpoint, hf_dir, texts=None, tmp=None):
    extra = []
    if texts is not None:
        path = tmp / "texts.json"
        path.write_text(json.dumps(texts))
        extra = ["--texts", str(path)]
    proc = python(str(ROOT / "tests" / "dist" / "hf_check.py"), "--checkpoint", str(checkpoint), "--hf",
                  str(hf_dir), *extra)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def some_texts(corpus_texts):
    rng = random.Random(1)
    chars = "abc xyz\n\t éü日🙂.,!?-0123456789 "
    odd = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    return corpus_texts[:200] + odd + ["  two  spaces\nnew line\n\n end ", " leading", "trailing ", ""]


def test_export_of_a_tp2_pp2_checkpoint_computes_the_megatron_models_logits_and_generations(
        tp2pp2, exported, corpus_texts, tmp_path):
    r = check(tp2pp2, exported, some_texts(corpus_texts), tmp_path)
    assert r["max_abs_diff"] < LOGIT_ATOL, r
    # the project computes GELU's tanh form on every device (model.gelu) and the export says so; the tolerance
    # tells it from exact GELU
    assert r["hidden_act"] == "gelu_pytorch_tanh" and r["other_gelu_diff"] > 5 * LOGIT_ATOL, r
    for g in r["generations"]:
        assert g["megatron"] == g["hf"] and len(g["megatron"]) > 0
    # the exported tokenizer: the project's ids on every text, <pause> one special token of the same id
    assert r["n_mismatched"] == 0, r["mismatched"]
    assert r["pause_pairs"] > 100 and r["n_pause_mismatched"] == 0, r["pause_mismatched"]
    assert r["hf_pause_id"] == r["pause_id"] and r["pause_text_ids"] == r["pause_text_expected"]
    assert (r["hf_bos"], r["hf_eos"], r["hf_pad"]) == (r["eod_id"], r["eod_id"], r["pad_id"])
    assert r["decoded"] == r["prompt"]
    # generate() never emits <pause> nor a padding id, as pause_megatron.evaluate decodes
    generation = json.loads((exported / "generation_config.json").read_text())
    padded = json.loads((exported / "config.json").read_text())["vocab_size"]
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        r["eod_id"], r["eod_id"], r["pad_id"])
    assert sorted(generation["suppress_tokens"]) == [r["pause_id"], *range(r["pause_id"] + 1, padded)]
    files = set(os.listdir(exported))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "generation_config.json"} <= files
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["use_parallel_residual"] is False


def neox_without_pause(tiny_c4, out, **config):
    """A random transformers GPT-NeoX made locally, with the corpus tokenizer minus `<pause>` (a model from
    elsewhere has never heard of pauses); returns its vocabulary size (the tokenizer's pieces)."""
    import torch
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    proto = pb.ModelProto()
    proto.ParseFromString((tiny_c4 / "tokenizer.model").read_bytes())
    assert proto.pieces[-1].piece == "<pause>"
    del proto.pieces[-1]
    torch.manual_seed(0)
    shape = dict(vocab_size=len(proto.pieces), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=128, rotary_pct=1.0, use_parallel_residual=False,
                 rotary_emb_base=500, hidden_act="gelu_new", initializer_range=0.2, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**shape, **config}))
    with torch.no_grad():  # non-zero biases and norms, so that a wrong mapping of any of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    return len(proto.pieces)


@pytest.fixture(scope="module")
def imported(tiny_c4, tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    neox_without_pause(tiny_c4, root / "x")
    proc = cli("import-hf", root / "x", root / "ckpt")
    overrides = proc.stdout.strip().splitlines()[-1].split(": ", 1)[1].split()
    return root, overrides


def test_import_of_a_random_transformers_model_keeps_its_logits_and_adds_pause(imported, tiny_c4):
    root, overrides = imported
    r = check(root / "ckpt", root / "x")
    assert r["max_abs_diff"] < LOGIT_ATOL and r["compared_vocab"] == 500, r
    for g in r["generations"]:
        assert g["megatron"] == g["hf"] and len(g["megatron"]) > 0
    import torch

    # the common state dist_checkpointing wrote (compat.LEGACY_COMMON_STATE), read without starting Megatron
    extra = torch.load(root / "ckpt" / "iter_0000000" / "common.pt", weights_only=False)["extra"]
    manifest = json.loads((tiny_c4 / "manifest.json").read_text())
    # <pause> added back where the corpus tokenizer has it: the same tokenizer, byte for byte
    assert extra["pause_id"] == 500 and extra["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert "model.num_layers=2" in overrides and "model.rotary_base=500" in overrides
    assert "model.gelu=tanh" in overrides
    # gelu_new is GELU's tanh form: the imported model computes it (model.gelu=tanh), not exact GELU
    assert extra["config"]["model"]["gelu"] == "tanh" and r["other_gelu_diff"] > 5 * LOGIT_ATOL, r


def test_export_of_an_import_reproduces_the_transformers_model(imported, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    root, _ = imported
    # a checkpoint trained with FP8 and Transformer Engine on a GPU converts on the CPU all the same (its common
    # state says so)
    ckpt = tmp_path / "fp8"
    shutil.copytree(root / "ckpt", ckpt)
    common = torch.load(ckpt / "iter_0000000" / "common.pt", weights_only=False)
    common["extra"]["config"]["precision"].update(fp8="hybrid", dtype="bf16")
    common["extra"]["config"]["model"]["spec"] = "te"
    torch.save(common, ckpt / "iter_0000000" / "common.pt")
    cli("export-hf", ckpt, tmp_path / "y")
    x, y = load_file(root / "x" / "model.safetensors"), load_file(tmp_path / "y" / "model.safetensors")
    assert set(x) == set(y)
    for name, tensor in x.items():
        got = y[name][: tensor.shape[0]] if name in ("gpt_neox.embed_in.weight", "embed_out.weight") else y[name]
        assert got.shape == tensor.shape and bool((got == tensor).all()), name
        if got is not y[name]:  # <pause> (500) and the padding rows start as the mean of the model's rows
            assert y[name].shape[0] == 512 and bool((y[name][500:] == tensor.mean(0)).all()), name
    config = json.loads((tmp_path / "y" / "config.json").read_text())
    x_config = json.loads((root / "x" / "config.json").read_text())
    for key in ("hidden_act", "rotary_emb_base", "rotary_pct", "use_parallel_residual", "intermediate_size"):
        assert config[key] == x_config[key], key


def test_pretraining_and_finetuning_start_from_an_imported_model(imported, tiny_c4, tmp_path):
    root, overrides = imported
    torchrun("-m pause_megatron.pretrain", f"data.path={tiny_c4}", f"train.output_dir={tmp_path / 'pt'}",
             f"train.init_from={root / 'ckpt'}", *overrides, "train.steps=2", "optim.warmup_steps=1",
             "train.global_batch_size=2", "train.micro_batch_size=2", "tracking.enabled=false")
    torchrun("-m pause_megatron.finetune", "task=piqa", f"train.init_from={root / 'ckpt'}",
             f"train.output_dir={tmp_path / 'ft'}", "pauses.m_ft=2", "train.steps=2", "optim.warmup_steps=1",
             "train.global_batch_size=2", "train.micro_batch_size=2", "tracking.enabled=false",
             f"data.task_dir={SAMPLES}")
    for stage in ("pt", "ft"):
        assert (tmp_path / stage / "checkpoints" / "iter_0000002" / "complete").exists()


def test_lm_evals_hf_backend_on_the_export_scores_as_our_evaluation_without_pauses(tp2pp2, exported, tmp_path):
    tasks = ["--tasks", "piqa,nq_open", "--data-dir", SAMPLES, "--limit", "4"]
    python("-m", "pause_megatron.evaluate", "--checkpoint", str(tp2pp2), *tasks, "--output",
           str(tmp_path / "ours.json"), "pauses.m_inf=0", "tracking.enabled=false")
    ours = json.loads((tmp_path / "ours.json").read_text())
    proc = python(str(ROOT / "tests" / "dist" / "hf_lm_eval.py"), "--hf", str(exported), *tasks,
                  HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    # ours also logs the row count and per-document sd (the report's intervals): compare the metrics lm-eval gives
    assert theirs["scores"] == {task: {k: v for k, v in m.items() if k in theirs["scores"][task]}
                                for task, m in ours["scores"].items()}
    assert all(ours["scores"][task]["n"] == 4 for task in ours["scores"])
    for task in ("piqa", "nq_open"):
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
        for x, y in zip(a, b):
            for rx, ry in zip(x["resps"], y["resps"]):
                if task == "piqa":  # (log-likelihood, is greedy)
                    assert rx[0] == pytest.approx(ry[0], abs=1e-4) and rx[1] == ry[1]
                else:  # the generated text
                    assert rx == ry


def refused_all(*calls):
    """Run each `pause-megatron` call in one process (one start-up); each must fail with exit code 2."""
    driver = ("import io, json, sys, contextlib\nfrom pause_megatron import cli\nout = []\n"
              "for args in json.loads(sys.argv[1]):\n    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n        out.append([cli.main(args), err.getvalue()])\n"
              "print(json.dumps(out))")
    results = json.loads(python("-c", driver, json.dumps([[str(a) for a in c] for c in calls])).stdout.splitlines()[-1])
    for rc, err in results:
        assert rc == 2, err[-3000:]
    return [err for _, err in results]


def nothing_written(out):
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_bad_inputs_are_refused_with_the_reason_and_leave_no_output(imported, tmp_path, corpus_texts):
    import shutil
    import subprocess

    from sentencepiece import sentencepiece_model_pb2 as pb

    from pause_megatron.tokenizer import train_tokenizer

    root, _ = imported
    out = tmp_path / "out"

    def variant(name, **changes):
        d = tmp_path / name
        shutil.copytree(root / "x", d)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d

    # a checkpoint next to another tokenizer than its own (<pause> there is id 367, not 500)
    other = tmp_path / "other_tok"
    shutil.copytree(root / "ckpt", other)
    train_tokenizer(corpus_texts, vocab_size=400).save(str(other / "tokenizer.model"))
    # the model's own SentencePiece model, but collapsing runs of spaces (SentencePiece's default): HF's ids
    # would differ; nothing else is wrong with it
    collapsing = variant("collapsing")
    proto = pb.ModelProto()
    proto.ParseFromString((collapsing / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (collapsing / "tokenizer.model").write_bytes(proto.SerializeToString())
    # what a conversion killed with -9 left: removed by the next one to the same output (its pid is dead)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".out.partial-{dead.pid}").mkdir()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    errors = refused_all(
        ["export-hf", tmp_path, out], ["import-hf", tmp_path, out], ["export-hf", other, out],
        ["import-hf", variant("mistral", model_type="mistral"), out],
        ["import-hf", variant("parallel", use_parallel_residual=True), out],
        ["import-hf", variant("pause", pause_token_id=3), out],
        ["import-hf", variant("act", hidden_act="relu"), out], ["import-hf", collapsing, out],
        ["import-hf", root / "x", existing],  # an existing output is never overwritten
        # fails only once the weights are read, after the output was started: still nothing left behind
        ["import-hf", variant("shape", intermediate_size=128), out])
    expected = ["is not a checkpoint", "not a Hugging Face model directory (no config.json)",
                "does not match the loaded tokenizer", "model_type 'mistral'", "use_parallel_residual",
                "pause_token_id says <pause> is id 3", "hidden_act='relu'",
                "the SentencePiece model normalizes text", "already exists", "mlp.dense_h_to_4h.weight has shape"]
    for want, err in zip(expected, errors):
        assert want in err, err[-2000:]
    nothing_written(out)
    assert os.listdir(existing) == ["keep"] and (existing / "keep").read_text() == "x"
