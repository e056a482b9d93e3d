"""Hugging Face `transformers` export and import: a checkpoint as a model directory, and back.

    pause-megatron export-hf CHECKPOINT OUT_DIR [--gelu exact|tanh]
    pause-megatron import-hf HF_DIR OUT_CHECKPOINT

Three architectures, one table each (ARCHITECTURES; docs/huggingface.md has the mapping):
- GPT-NeoX with `use_parallel_residual=False`, for the paper's presets: pre-LayerNorm blocks with a sequential
  residual, biased QKV / output / MLP linears, a GELU MLP, RoPE on the whole head dimension with non-interleaved
  `rotate_half`, a final LayerNorm and an untied, bias-free output layer. Megatron's `linear_qkv` rows are
  grouped per query group as [q, k, v]; with one query group per head that is NeoX's `query_key_value` layout.
- Llama (LlamaForCausalLM) and Qwen2 (Qwen2ForCausalLM), for the Llama-family settings of `model`
  (RMSNorm, SwiGLU, grouped-query attention, no biases / QKV biases, Llama 3 RoPE scaling, tied embeddings):
  HF's separate q/k/v and gate/up projections are fused into Megatron's linear_qkv and linear_fc1.
The architecture written is the one that computes the checkpoint's model (`exporter`).

Both directions run the model at TP=1, PP=1 in one process on the CPU, in fp32; dist_checkpointing reshards
any saved layout. Both write into a temporary directory next to the output and rename it at the end, so an
output that exists is whole.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional

import torch

from pause_megatron import tokenizer as tokenizers
from pause_megatron.tokenizer import PAUSE_PIECE, BaseTokenizer, HFTokenizer, padded_vocab_size

LAYER_NORM_EPS = 1e-5  # the GPT-NeoX epsilon export-hf writes and import-hf reads (model.norm_epsilon's default)
# NeoX names of Megatron's local-spec parameters, per layer and outside the layers
LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "attention.dense.weight",
    "self_attention.linear_proj.bias": "attention.dense.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}
TOP_MAP = {
    "embedding.word_embeddings.weight": "gpt_neox.embed_in.weight",
    "decoder.final_layernorm.weight": "gpt_neox.final_layer_norm.weight",
    "decoder.final_layernorm.bias": "gpt_neox.final_layer_norm.bias",
    "output_layer.weight": "embed_out.weight",
}
GELU = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}  # HF's names of model.gelu's two functions
# HF activations and the model.gelu that computes them (gelu_new / gelu_fast: the tanh formula written out)
HF_GELUS = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


class ConversionError(ValueError):
    """A model or directory the conversion cannot take; the message says what and why."""


def _cpu_only() -> None:
    """Conversion runs on the CPU in fp32 whatever the machine has (before anything reads use_cuda)."""
    os.environ["PAUSE_MEGATRON_CPU"] = "1"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _staging(out: str) -> str:
    """A fresh temporary directory next to `out` (same filesystem: the final rename is atomic)."""
    if os.path.exists(out):
        raise ConversionError(f"{out} already exists: give a new output path (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(out))}.partial-"
    for name in os.listdir(parent):  # left by a conversion that was killed (kill -9 runs no cleanup)
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def require_lossless(tokenizer: BaseTokenizer, where: str) -> None:
    """The HF tokenizer reproduces SentencePiece's segmentation, not its normalizer: a model that rewrites text
    (NFKC, collapsed spaces) would get other ids from it than the project gives. A tokenizer.json is not
    converted (export writes the very same one, `<pause>` included): its ids are ours whatever it normalizes
    (Qwen2's NFC, say), so every one passes."""
    if isinstance(tokenizer, HFTokenizer):
        return
    if not tokenizer.lossless:
        raise ConversionError(f"{where}: the SentencePiece model normalizes text (a normalizer other than 'identity',"
                              " or remove_extra_whitespaces), so a Hugging Face tokenizer would give other ids; only"
                              " lossless tokenizers (pause_megatron.tokenizer.train_tokenizer's) convert")


# ---- export --------------------------------------------------------------------------------------------

def expressible(cfg) -> None:
    """Raise ConversionError for a model GPT-NeoX cannot compute exactly."""
    m = cfg.model
    if m.position_embedding != "rope":
        raise ConversionError(f"model.position_embedding={m.position_embedding!r}: GPT-NeoX has rotary position "
                              "embeddings only, not learned absolute ones")
    if m.normalization != "LayerNorm":
        raise ConversionError(f"model.normalization={m.normalization!r}: GPT-NeoX has LayerNorm only")
    # Checked on the config, before the model loads: neox_config writes no RoPE scaling, so nothing later would
    # notice the factor, and the exported model would silently compute without it.
    if m.rope_scaling_factor is not None:
        raise ConversionError(f"model.rope_scaling_factor={m.rope_scaling_factor}: a model with a GELU MLP is written"
                              " as GPT-NeoX, and export-hf writes GPT-NeoX without RoPE scaling (Llama 3's scaling"
                              " is exported with model.mlp=swiglu, as Llama)")
    if m.linear_bias != "all":
        raise ConversionError(f"model.linear_bias={m.linear_bias!r}: GPT-NeoX has biases on every linear layer")
    if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads:
        raise ConversionError(f"model.num_query_groups={m.num_query_groups}: GPT-NeoX has one key/value head per "
                              "query head")
    if m.norm_epsilon != LAYER_NORM_EPS:
        raise ConversionError(f"model.norm_epsilon={m.norm_epsilon}: export-hf writes GPT-NeoX with "
                              f"layer_norm_eps={LAYER_NORM_EPS}")


def neox_config(cfg, tconfig, tokenizer: BaseTokenizer, *, vocab_size: int, hidden_act: str):
    from transformers import GPTNeoXConfig

    if tconfig.num_query_groups not in (None, tconfig.num_attention_heads):
        raise ConversionError("grouped-query attention: GPT-NeoX has one key/value head per query head")
    if tconfig.rotary_interleaved:
        raise ConversionError("interleaved RoPE: GPT-NeoX rotates halves (rotate_half)")
    if not tconfig.add_bias_linear or tconfig.gated_linear_unit or tconfig.qk_layernorm:
        raise ConversionError("only biased linears, a plain (not gated) MLP and no QK LayerNorm map to GPT-NeoX")
    if tconfig.layernorm_epsilon != LAYER_NORM_EPS:
        raise ConversionError(f"layernorm_epsilon={tconfig.layernorm_epsilon}, expected {LAYER_NORM_EPS}")
    m = cfg.model
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_hidden_size, hidden_act=hidden_act,
        rotary_pct=1.0, rotary_emb_base=m.rotary_base, attention_dropout=0.0, hidden_dropout=0.0,
        max_position_embeddings=m.seq_length, initializer_range=m.init_method_std, layer_norm_eps=LAYER_NORM_EPS,
        use_cache=True, bos_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id,
        tie_word_embeddings=False, use_parallel_residual=False, attention_bias=True,
        architectures=["GPTNeoXForCausalLM"], torch_dtype="float32",
        pause_token_id=tokenizer.pause_id,  # read back by import-hf; the model itself ignores it
    )


def hf_tokenizer(tokenizer: BaseTokenizer, workdir: str, *, max_length: int):
    """The Hugging Face tokenizer of `tokenizer`, whichever its kind: ids exactly as `tokenizer.encode` gives them."""
    if isinstance(tokenizer, HFTokenizer):
        return fast_tokenizer(tokenizer, max_length=max_length)
    return sentencepiece_fast_tokenizer(tokenizer, workdir, max_length=max_length)


def fast_tokenizer(tokenizer: HFTokenizer, *, max_length: int):
    """A PreTrainedTokenizerFast on the checkpoint's own tokenizer.json (`<pause>` included, same ids).

    Its post-processor is kept: `encode(text)` gives the project's ids of a sequence's start, the BOS first when
    the tokenizer has one (Llama 3), as data prep, finetuning and evaluation begin every sequence with it. The
    bos token is that BOS, else EOD (documents are separated by EOD in pretraining, as for SentencePiece below).
    A literal "<pause>" in a prompt becomes the one token (transformers splits special tokens out of text, the
    project never does).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.eos_token
    bos = eos if tokenizer.bos_id is None else tokenizer.tk.id_to_token(tokenizer.bos_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.serialized.decode()), bos_token=bos,
                                   eos_token=eos, pad_token=tokenizer.pad_token, additional_special_tokens=[PAUSE_PIECE],
                                   clean_up_tokenization_spaces=False, model_max_length=max_length)
    got = fast.convert_tokens_to_ids(PAUSE_PIECE)
    if got != tokenizer.pause_id:
        raise ConversionError(f"the Hugging Face tokenizer gives <pause> id {got}, the checkpoint {tokenizer.pause_id}")
    return fast


def sentencepiece_fast_tokenizer(tokenizer, workdir: str, *, max_length: int):
    """A LlamaTokenizerFast from the SentencePiece model: ids exactly as `tokenizer.encode` gives them.

    legacy + add_prefix_space reproduce SentencePiece's dummy prefix ("▁" before the text) and its unigram
    segmentation with byte fallback; no BOS/EOS is added. The file written is tokenizer.json as built here
    (tokenizer_config.json has no add_prefix_space, which would make transformers convert tokenizer.model anew). EOD (`</s>`) is both bos and eos: documents are
    separated by EOD in pretraining, so it is what an empty context starts from (lm-eval's prefix token).
    `<pause>` is an additional special token: `convert_tokens_to_ids("<pause>")` is the pause id and a literal
    "<pause>" in a prompt becomes that one token (SentencePiece itself never encodes text to it).
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import LlamaTokenizerFast

    require_lossless(tokenizer, "the checkpoint's tokenizer.model")
    sp = tokenizer.sp
    path = os.path.join(workdir, "tokenizer.model")
    tokenizer.save(path)
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    common = dict(vocab_file=path, legacy=True, add_bos_token=False, add_eos_token=False, unk_token=unk,
                  bos_token=sp.id_to_piece(tokenizer.eod_id), eos_token=sp.id_to_piece(tokenizer.eod_id),
                  pad_token=sp.id_to_piece(tokenizer.pad_id), clean_up_tokenization_spaces=False,
                  model_max_length=max_length)
    converted = LlamaTokenizerFast(from_slow=True, add_prefix_space=True, additional_special_tokens=[PAUSE_PIECE],
                                   **common).backend_tokenizer
    # The dummy prefix is a normalizer (Prepend "▁"), and the normalizer runs on each piece of text between
    # non-normalized added tokens: text after a "<pause>" would get a second "▁" (" yes" -> "▁▁yes"), which
    # the project never gives (pauses go between a context's and a continuation's ids, encode_pair). A
    # normalized <pause> is found after normalization instead, so the prefix is added once, at the start.
    spec = json.loads(converted.to_str())
    for token in spec["added_tokens"]:
        if token["content"] == PAUSE_PIECE:
            token["normalized"] = True
    fast = LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), additional_special_tokens=[
        AddedToken(PAUSE_PIECE, special=True, normalized=True)], **common)
    got = fast.convert_tokens_to_ids(PAUSE_PIECE)
    if got != tokenizer.pause_id:
        raise ConversionError(f"the Hugging Face tokenizer gives <pause> id {got}, the checkpoint {tokenizer.pause_id}")
    return fast


def saved_gelu(extra: dict, asked: Optional[str]) -> tuple[str, str]:
    """(model.gelu, HF hidden_act) for a checkpoint's `extra`. A checkpoint records model.gelu in its config; one
    saved before the field existed computed exact GELU on the CPU and the tanh form on a GPU, so which one it was
    trained with is unknown: `asked` (--gelu) decides, else tanh (what the project computes for it now)."""
    model = (extra.get("config") or {}).get("model") or {}
    if "gelu" in model:
        if asked is not None and asked != model["gelu"]:
            raise ConversionError(f"--gelu {asked}: the checkpoint records model.gelu={model['gelu']!r}")
        gelu = model["gelu"]
    else:
        gelu = asked or "tanh"
        print(f"warning: the checkpoint does not record its GELU (saved before model.gelu existed: exact GELU if "
              f"it was trained on the CPU, the tanh approximation on a GPU); writing {gelu!r} (--gelu)",
              file=sys.stderr)
    hf_act = extra.get("hf_hidden_act")  # an imported model keeps its own name of the same function
    return gelu, hf_act if HF_GELUS.get(hf_act) == gelu else GELU[gelu]


def export(checkpoint_path: str, out_dir: str, *, gelu: Optional[str] = None) -> str:
    """Write `checkpoint_path` (any TP/PP layout) as a model directory at `out_dir` (GPT-NeoX, Llama or Qwen2:
    the architecture that computes it, `exporter`); returns it."""
    _cpu_only()
    from transformers import GenerationConfig

    from pause_megatron import checkpoint, runtime
    from pause_megatron.config import load_config
    from pause_megatron.evaluate import load_for_inference
    from pause_megatron.model import unwrap

    extra = checkpoint.read_extra(checkpoint_path)  # FileNotFoundError for what is not a checkpoint
    gelu, hidden_act = saved_gelu(extra, gelu)
    # fp32 on the CPU: the training run's GPU-only settings (bf16, FP8, Transformer Engine) do not apply
    overrides = ["precision.dtype=fp32", "precision.fp8=null", "model.spec=local", "pauses.m_inf=0",
                 f"model.gelu={gelu}"]
    probe = dict(extra.get("config") or {})
    probe.pop("task", None)
    probe.pop("parallel", None)
    arch = exporter(load_config(None, overrides, base=probe, hardware=False))
    require_lossless(tokenizers.load(checkpoint.tokenizer_path(checkpoint_path)), checkpoint_path)
    tmp = _staging(out_dir)
    try:
        model, cfg, tokenizer = load_for_inference(checkpoint_path, overrides)
        model = unwrap(model)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        if "output_layer.weight" not in state:  # tied embeddings: the head is the embedding table
            state["output_layer.weight"] = state["embedding.word_embeddings.weight"]
        vocab = state["embedding.word_embeddings.weight"].shape[0]
        config = arch.hf_config(cfg, model.config, tokenizer, vocab_size=vocab, hidden_act=hidden_act)
        hf_state = arch.to_hf({name: t.detach().float().clone() for name, t in state.items()}, cfg)
        with torch.device("meta"):
            hf = arch.model_class()(config)
        missing = set(hf.state_dict()) - set(hf_state)
        if missing:
            raise ConversionError(f"no Megatron weight for {sorted(missing)[:4]}")
        hf.load_state_dict(hf_state, strict=True, assign=True)
        hf.tie_weights()  # a tied model's head is its embedding table (one tensor, saved once)
        hf.save_pretrained(tmp, safe_serialization=True)
        # Decoding never emits <pause> nor a padded id, as pause_megatron.evaluate decodes (greedy_pick).
        GenerationConfig(bos_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.pad_id,
                         do_sample=False, suppress_tokens=[tokenizer.pause_id, *range(tokenizer.vocab_size, vocab)]
                         ).save_pretrained(tmp)
        hf_tokenizer(tokenizer, tmp, max_length=cfg.model.seq_length).save_pretrained(tmp)
        with open(os.path.join(tmp, "pause_megatron.json"), "w") as f:
            json.dump({"source": os.path.abspath(checkpoint_path), "gelu": gelu, **tokenizer.record()}, f, indent=1)
        runtime.destroy()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        runtime.destroy()
        raise
    return out_dir


def _to_neox(name: str) -> str:
    if name in TOP_MAP:
        return TOP_MAP[name]
    prefix, _, rest = name.partition(".layers.")
    layer, _, sub = rest.partition(".")
    if prefix != "decoder" or sub not in LAYER_MAP:
        raise ConversionError(f"Megatron parameter {name} has no GPT-NeoX counterpart")
    return f"gpt_neox.layers.{layer}.{LAYER_MAP[sub]}"


# ---- import --------------------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_hf_config(hf_dir: str) -> tuple:
    """(architecture, config.json) of the model at `hf_dir`, checked to be one our GPTModel computes exactly."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir) or not os.path.exists(path):
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    c = _read_json(path)
    kind = c.get("model_type")
    if kind not in ARCHITECTURES:
        raise ConversionError(f"{path}: model_type {kind!r} (architectures {c.get('architectures')}) is not supported;"
                              f" import-hf reads {', '.join(repr(k) for k in ARCHITECTURES)}")
    arch = ARCHITECTURES[kind]
    return arch, arch.read(path, c)


def hf_model_overrides(hf_dir: str, seq_length: Optional[int] = None) -> list[str]:
    """The model.* overrides of the checkpoint import-hf writes from `hf_dir` (`model_overrides_of`): what a run
    needs to start from it (the recipe plans its pretrainings with them before the import has run)."""
    arch, c = read_hf_config(hf_dir)
    return model_overrides_of(arch, c, seq_length, divisible_by=import_vocab(hf_dir)[1])


def model_overrides_of(arch, c: dict, seq_length: Optional[int], *, divisible_by: int = 128) -> list[str]:
    """The architecture's overrides for config.json `c` and the vocabulary's divisor (`vocab_rows`), then every
    other config.ARCHITECTURE_KEYS at the value they give (the defaults filled in), so that a run whose config or
    preset sets another one gets this model."""
    from pause_megatron.config import load_config, model_overrides, to_dict

    own = [*arch.overrides(c, seq_length), f"model.make_vocab_size_divisible_by={divisible_by}"]
    full = model_overrides(to_dict(load_config(None, own, hardware=False))["model"])
    keys = {o.split("=", 1)[0] for o in own}
    return [*own, *(o for o in full if o.split("=", 1)[0] not in keys)]


def vocab_rows(hf_vocab: int, tokens: int) -> tuple[int, int]:
    """The imported checkpoint's padded vocabulary and its model.make_vocab_size_divisible_by, for an HF model of
    `hf_vocab` rows and a tokenizer of `tokens` ids (`<pause>` included): the tokens rounded up to a multiple of
    128, or the model's own vocab_size when that is larger (Qwen2.5: 151936 rows for 151665 tokens; the spare
    rows kept, `<pause>` in the first free one). Recording the divisor that pads the tokenizer to exactly
    vocab_size makes every later run pad to the same size."""
    divisible_by = 128 if hf_vocab <= padded_vocab_size(tokens) else hf_vocab
    return padded_vocab_size(tokens, divisible_by=divisible_by), divisible_by


def import_vocab(hf_dir: str) -> tuple[int, int]:
    """`vocab_rows` of the checkpoint import-hf writes from `hf_dir`: the tokenizer's size when the directory has
    a readable one, else config.json's vocab_size plus one for `<pause>` unless the directory declares it."""
    c = _read_json(os.path.join(hf_dir, "config.json"))
    tok_path = tokenizers.tokenizer_file(hf_dir)
    try:
        tokens = tokenizers.load(tok_path).vocab_size if tok_path else None
    except tokenizers.UnreadableTokenizer:  # import-hf itself refuses it, naming the file
        tokens = None
    if tokens is None:
        tokens = int(c["vocab_size"]) + (0 if _special_pause_ids(hf_dir, c) else 1)
    return vocab_rows(int(c["vocab_size"]), tokens)


def import_vocab_size(hf_dir: str) -> int:
    """The padded vocabulary of the checkpoint import-hf writes from `hf_dir` (`import_vocab`)."""
    return import_vocab(hf_dir)[0]


DEFAULT_SEQ_LENGTH = 2048  # the paper's and the Llama-family presets' training length


def default_seq_length(c: dict) -> int:
    """import-hf's model.seq_length without --seq-length: the model's max_position_embeddings, at most 2048.
    It is a training length, not the model's limit (Llama-3.2-1B allows 131072: far beyond what a run uses)."""
    return min(int(c["max_position_embeddings"]), DEFAULT_SEQ_LENGTH)


def _need(path: str):
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConversionError(f"{path}: {what}, which the project's GPTModel does not compute")
    return need


def _check_neox(path: str, c: dict) -> dict:
    need = _need(path)
    need(c.get("use_parallel_residual", True) is False, "use_parallel_residual is not false (a parallel residual)")
    need(float(c.get("rotary_pct", 0.25)) == 1.0, f"rotary_pct={c.get('rotary_pct', 0.25)} (RoPE on part of a head)")
    rope = c.get("rope_scaling")
    need(rope in (None, {}) or isinstance(rope, dict) and rope.get("rope_type") == "default",
         f"rope_scaling={c.get('rope_scaling')}")
    need(float(c.get("layer_norm_eps", 1e-5)) == LAYER_NORM_EPS, f"layer_norm_eps={c.get('layer_norm_eps')}")
    need(c.get("hidden_act", "gelu") in HF_GELUS, f"hidden_act={c.get('hidden_act')!r} (model.gelu computes "
         f"{', '.join(HF_GELUS)})")
    return c


def _special_pause_ids(hf_dir: str, config: dict) -> dict[str, int]:
    """Where the HF directory says `<pause>` is: config.json's pause_token_id, tokenizer files' added tokens."""
    found = {}
    if config.get("pause_token_id") is not None:
        found["config.json pause_token_id"] = int(config["pause_token_id"])
    path = os.path.join(hf_dir, "tokenizer_config.json")
    if os.path.exists(path):
        for tid, tok in (_read_json(path).get("added_tokens_decoder") or {}).items():
            if tok.get("content") == PAUSE_PIECE:
                found["tokenizer_config.json added token"] = int(tid)
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.exists(path):
        for tok in _read_json(path).get("added_tokens") or []:
            if tok.get("content") == PAUSE_PIECE:
                found["tokenizer.json added token"] = int(tok["id"])
    return found


def _grow(table: torch.Tensor, rows: int, pieces: int, new: list[int]) -> torch.Tensor:
    """`table` with `rows` rows; rows it lacks and the rows in `new` are the mean of its first `pieces` rows
    (the tokenizer's), so that a new token starts inside the distribution of the trained ones."""
    mean = table[:pieces].mean(0)
    out = mean.expand(rows, -1).clone()
    keep = min(rows, table.shape[0])
    out[:keep] = table[:keep]
    out[new] = mean
    return out


def import_(hf_dir: str, out_root: str, *, seq_length: Optional[int] = None) -> str:
    """Write the model in `hf_dir` (GPT-NeoX, Llama or Qwen2: ARCHITECTURES) as a checkpoint root at `out_root`
    (iter_0000000, `latest`, its tokenizer) from which `train.init_from` starts pretraining or finetuning;
    returns it."""
    _cpu_only()
    from safetensors.torch import load_file

    from pause_megatron import checkpoint, runtime
    from pause_megatron.compat import save_checkpoint
    from pause_megatron.config import load_config, to_dict
    from pause_megatron.model import build_gpt

    arch, c = read_hf_config(hf_dir)
    tok_path = tokenizers.tokenizer_file(hf_dir)
    if tok_path is None:
        raise ConversionError(f"{hf_dir}: no tokenizer.model or tokenizer.json; import-hf needs the model's tokenizer")
    tokenizer = tokenizers.load(tok_path)
    require_lossless(tokenizer, tok_path)
    pieces = tokenizer.vocab_size - (0 if tokenizer.had_pause else 1)  # the pieces the HF model was made for
    for where, pid in _special_pause_ids(hf_dir, c).items():
        if pid != tokenizer.pause_id:
            raise ConversionError(f"{hf_dir}: {where} says <pause> is id {pid}, but the tokenizer "
                                  f"{tok_path} gives it id {tokenizer.pause_id}")
    hf_vocab = int(c["vocab_size"])
    if hf_vocab < pieces:
        raise ConversionError(f"{hf_dir}: vocab_size={hf_vocab} is smaller than its tokenizer ({pieces} pieces)")
    # The padded vocabulary: the tokenizer's size (<pause> included) rounded up to a multiple of 128, or the
    # model's own vocab_size when that is larger (Qwen2.5: 151936 rows for 151665 tokens), the model's spare
    # rows kept and <pause> in the first free one. The divisor that pads the tokenizer's size to exactly
    # vocab_size is recorded as model.make_vocab_size_divisible_by, so every later run pads to the same size.
    vocab, divisible_by = vocab_rows(hf_vocab, tokenizer.vocab_size)
    weights = _read_weights(hf_dir, load_file)
    overrides = [*model_overrides_of(arch, c, seq_length, divisible_by=divisible_by), "model.spec=local",
                 "precision.dtype=fp32", "tracking.enabled=false"]
    cfg = load_config(None, overrides)
    tmp = _staging(out_root)
    try:
        runtime.init_distributed(cfg)
        model = build_gpt(cfg, vocab_size=vocab, cuda=False)
        new_rows = [] if tokenizer.had_pause else [tokenizer.pause_id]
        params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        mapped = arch.from_hf(weights, c, params, hf_dir)
        state = {}
        for name, value in model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            key, tensor = mapped[name]
            tensor = tensor.float()
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                tensor = _grow(tensor, vocab, pieces, new_rows)
            if tensor.shape != value.shape:
                raise ConversionError(f"{hf_dir}: {key} has shape {tuple(tensor.shape)}, expected {tuple(value.shape)}")
            state[name] = tensor
        missing = [k for k in model.load_state_dict(state, strict=False).missing_keys if not k.endswith("_extra_state")]
        assert not missing, missing
        path = checkpoint.iteration_dir(tmp, 0)
        os.makedirs(path)
        extra = {"config": to_dict(cfg), "stage": "import-hf", "source": os.path.abspath(hf_dir), **tokenizer.record(),
                 "hf_hidden_act": c.get("hidden_act", "gelu")}
        save_checkpoint({"model": model.sharded_state_dict(), "step": 0, "consumed_samples": 0, "extra": extra}, path)
        open(os.path.join(path, checkpoint.COMPLETE), "w").close()
        with open(os.path.join(tmp, checkpoint.LATEST), "w") as f:
            f.write(os.path.basename(path) + "\n")
        tokenizer.save(os.path.join(tmp, tokenizer.file_name))
        runtime.destroy()
        os.rename(tmp, out_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        runtime.destroy()
        raise
    return out_root


def _read_weights(hf_dir: str, load_file) -> dict:
    """Every tensor of the model's safetensors files (one file, or shards named by an index)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"{hf_dir}: no model.safetensors (or index); save the model with safe_serialization")
    weights = {}
    for name in files:
        weights.update(load_file(os.path.join(hf_dir, name)))
    return weights


# ---- architectures: one table each, for both directions -------------------------------------------------

class NeoX:
    """GPTNeoXForCausalLM with use_parallel_residual=False: the paper's GPT (LayerNorm, GELU, biased linears)."""

    model_type = "gpt_neox"

    @staticmethod
    def model_class():
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM

    read = staticmethod(_check_neox)
    hf_config = staticmethod(neox_config)

    @staticmethod
    def to_hf(state: dict, cfg) -> dict:
        return {_to_neox(name): tensor for name, tensor in state.items()}

    @staticmethod
    def overrides(c: dict, seq_length: Optional[int]) -> list[str]:
        return [f"model.num_layers={c['num_hidden_layers']}", f"model.hidden_size={c['hidden_size']}",
                f"model.num_attention_heads={c['num_attention_heads']}",
                f"model.ffn_hidden_size={c['intermediate_size']}",
                f"model.seq_length={seq_length or default_seq_length(c)}",
                f"model.rotary_base={int(c.get('rotary_emb_base', 10000))}", "model.position_embedding=rope",
                "model.normalization=LayerNorm", "model.untie_embeddings=true",
                f"model.gelu={HF_GELUS[c.get('hidden_act', 'gelu')]}",
                f"model.hidden_dropout={float(c.get('hidden_dropout', 0.0))}",
                f"model.attention_dropout={float(c.get('attention_dropout', 0.0))}",
                f"model.init_method_std={float(c.get('initializer_range', 0.02))}"]

    @staticmethod
    def from_hf(weights: dict, c: dict, params: dict, hf_dir: str) -> dict:
        """{Megatron name: (HF name, tensor)} for every parameter in `params` (Megatron name: tensor)."""
        out = {}
        for name, value in params.items():
            key = _to_neox(name)
            if key == "embed_out.weight" and key not in weights and c.get("tie_word_embeddings", True):
                key = "gpt_neox.embed_in.weight"
            if key not in weights:
                if key.endswith(".bias") and c.get("attention_bias", True) is False and ".attention." in key:
                    out[name] = (key, torch.zeros_like(value))  # no bias computes what a zero bias does
                    continue
                raise ConversionError(f"{hf_dir}: no weight {key} in the safetensors files")
            out[name] = (key, weights[key])
        return out


# Llama 3.x's RoPE frequency scaling as Megatron-Core computes it: only the factor is free
# (RotaryEmbedding._apply_scaling fixes the other three, in 0.16.1 and 0.19 alike)
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


class LlamaFamily:
    """LlamaForCausalLM (no linear biases) and Qwen2ForCausalLM (biases on q, k, v only): pre-RMSNorm blocks,
    a SwiGLU MLP down_proj(silu(gate_proj(x)) * up_proj(x)), grouped-query attention, RoPE on the whole head with
    rotate_half (Megatron's non-interleaved rotary), tied or untied embeddings.

    Megatron fuses two pairs of HF linears: linear_qkv holds, per query group g, the rows of g's query heads, then
    g's key head, then its value head ([q_g..., k_g, v_g] for g = 0..groups-1); linear_fc1 holds [gate; up]
    (the first half goes through silu). The rest map one to one (LAYER)."""

    LAYER = {"input_layernorm.weight": "input_layernorm.weight",
             "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
             "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
             "mlp.linear_fc2.weight": "mlp.down_proj.weight"}
    TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}

    def __init__(self, model_type: str, class_name: str, linear_bias: str):
        self.model_type, self.class_name, self.linear_bias = model_type, class_name, linear_bias

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)

    def _config_class(self):
        import transformers

        return getattr(transformers, self.class_name.replace("ForCausalLM", "Config"))

    def read(self, path: str, c: dict) -> dict:
        """config.json with the architecture's defaults filled in (transformers' own config class), checked."""
        need = _need(path)
        full = self._config_class().from_dict(c).to_dict()
        heads, hidden = int(full["num_attention_heads"]), int(full["hidden_size"])
        need(full.get("hidden_act") == "silu", f"hidden_act={full.get('hidden_act')!r} (SwiGLU is silu)")
        need(hidden % heads == 0, f"hidden_size={hidden} not divisible by num_attention_heads={heads}")
        need(full.get("head_dim") in (None, hidden // heads), f"head_dim={full.get('head_dim')} (not hidden/heads)")
        need(not full.get("attention_bias") and not full.get("mlp_bias"),
             "attention_bias or mlp_bias (biases on every attention or MLP linear)")
        need(not full.get("use_sliding_window"), "use_sliding_window (sliding-window attention)")
        rope = full.get("rope_scaling") or None
        if rope is not None and rope.get("rope_type", rope.get("type")) == "default":  # transformers' "no scaling"
            rope = full["rope_scaling"] = None
        if rope is not None:
            need(rope.get("rope_type", rope.get("type")) == "llama3"
                 and all(float(rope.get(k, -1)) == v for k, v in LLAMA3_ROPE.items() if k != "rope_type"),
                 f"rope_scaling={rope} (Megatron-Core's RoPE scaling is Llama 3's with {LLAMA3_ROPE})")
        need(float(full.get("rope_theta", 10000)).is_integer(), f"rope_theta={full.get('rope_theta')}")
        return full

    def overrides(self, c: dict, seq_length: Optional[int]) -> list[str]:
        rope = c.get("rope_scaling") or {}
        return [f"model.num_layers={c['num_hidden_layers']}", f"model.hidden_size={c['hidden_size']}",
                f"model.num_attention_heads={c['num_attention_heads']}",
                f"model.num_query_groups={c.get('num_key_value_heads') or c['num_attention_heads']}",
                f"model.ffn_hidden_size={c['intermediate_size']}",
                f"model.seq_length={seq_length or default_seq_length(c)}",
                f"model.rotary_base={int(float(c.get('rope_theta', 10000)))}",
                f"model.rope_scaling_factor={float(rope['factor']) if rope else 'null'}",
                "model.position_embedding=rope", "model.normalization=RMSNorm", "model.mlp=swiglu",
                f"model.linear_bias={self.linear_bias}", f"model.norm_epsilon={float(c['rms_norm_eps'])}",
                f"model.untie_embeddings={'false' if c.get('tie_word_embeddings') else 'true'}",
                "model.hidden_dropout=0.0", f"model.attention_dropout={float(c.get('attention_dropout', 0.0))}",
                f"model.init_method_std={float(c.get('initializer_range', 0.02))}"]

    def hf_config(self, cfg, tconfig, tokenizer: PauseTokenizer, *, vocab_size: int, hidden_act: str):
        m = cfg.model
        if m.normalization != "RMSNorm" or m.position_embedding != "rope" or tconfig.rotary_interleaved:
            raise ConversionError(f"{self.class_name} has RMSNorm and non-interleaved RoPE; the checkpoint has "
                                  f"model.normalization={m.normalization}, "
                                  f"model.position_embedding={m.position_embedding}")
        kwargs = dict(
            vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups or m.num_attention_heads, hidden_act="silu",
            max_position_embeddings=m.seq_length, initializer_range=m.init_method_std, rms_norm_eps=m.norm_epsilon,
            tie_word_embeddings=not m.untie_embeddings, rope_theta=float(m.rotary_base),
            rope_scaling=None if m.rope_scaling_factor is None else {**LLAMA3_ROPE, "factor": m.rope_scaling_factor},
            attention_dropout=0.0, use_cache=True, bos_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id,
            pad_token_id=tokenizer.pad_id, architectures=[self.class_name], torch_dtype="float32",
            pause_token_id=tokenizer.pause_id)  # read back by import-hf; the model itself ignores it
        if self.model_type == "llama":
            kwargs.update(attention_bias=False, mlp_bias=False)
        return self._config_class()(**kwargs)

    @staticmethod
    def _layer(name: str) -> tuple[str, str]:
        prefix, _, rest = name.partition(".layers.")
        layer, _, sub = rest.partition(".")
        if prefix != "decoder" or not layer.isdigit():
            raise ConversionError(f"Megatron parameter {name} has no Llama-family counterpart")
        return f"model.layers.{layer}.", sub

    def to_hf(self, state: dict, cfg) -> dict:
        heads, groups = cfg.model.num_attention_heads, cfg.model.num_query_groups or cfg.model.num_attention_heads
        out = {}
        for name, tensor in state.items():
            if name in self.TOP:
                out[self.TOP[name]] = tensor
                continue
            hf, sub = self._layer(name)
            if sub in self.LAYER:
                out[hf + self.LAYER[sub]] = tensor
            elif sub in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                kind = sub.rsplit(".", 1)[1]
                for proj, part in zip("qkv", split_qkv(tensor, heads, groups)):
                    out[f"{hf}self_attn.{proj}_proj.{kind}"] = part
            elif sub == "mlp.linear_fc1.weight":
                out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = tensor.chunk(2, dim=0)
            else:
                raise ConversionError(f"Megatron parameter {name} has no {self.class_name} counterpart")
        return out

    def from_hf(self, weights: dict, c: dict, params: dict, hf_dir: str) -> dict:
        def get(key: str) -> torch.Tensor:
            if key not in weights:
                raise ConversionError(f"{hf_dir}: no weight {key} in the safetensors files")
            used.add(key)
            return weights[key]

        heads = int(c["num_attention_heads"])
        groups = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c["hidden_size"]) // heads
        used = set()
        out = {}
        for name in params:
            if name in self.TOP:
                key = self.TOP[name]
                out[name] = (key, get(key))
                continue
            hf, sub = self._layer(name)
            if sub in self.LAYER:
                key = hf + self.LAYER[sub]
                out[name] = (key, get(key))
            elif sub in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                keys = [f"{hf}self_attn.{p}_proj.{sub.rsplit('.', 1)[1]}" for p in "qkv"]
                parts = [get(k) for k in keys]
                for key, part, n in zip(keys, parts, (heads, groups, groups)):  # fuse_qkv would reshape any size
                    if part.shape[0] != n * head_dim or part.shape[1:] != params[name].shape[1:]:
                        raise ConversionError(f"{hf_dir}: {key} has shape {tuple(part.shape)}, expected "
                                              f"{(n * head_dim, *params[name].shape[1:])} ({n} heads of {head_dim})")
                out[name] = ("/".join(keys), fuse_qkv(*parts, groups=groups))
            elif sub == "mlp.linear_fc1.weight":
                keys = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
                out[name] = ("/".join(keys), torch.cat([get(k) for k in keys], dim=0))
            else:
                raise ConversionError(f"Megatron parameter {name} has no {self.class_name} counterpart")
        unused = sorted(set(weights) - used)
        if unused:  # a weight the model would compute with, which ours would silently drop
            raise ConversionError(f"{hf_dir}: weights {unused[:4]} have no place in the model config.json describes")
        return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: int) -> torch.Tensor:
    """HF's separate q, k, v projections (weights or biases) as Megatron's linear_qkv: per query group
    [its query heads' rows, its key head's rows, its value head's rows]."""
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple:
    """The inverse of fuse_qkv: (q, k, v)."""
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = qkv.reshape(groups, -1, *qkv.shape[1:])
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


ARCHITECTURES = {"gpt_neox": NeoX, "llama": LlamaFamily("llama", "LlamaForCausalLM", "none"),
                 "qwen2": LlamaFamily("qwen2", "Qwen2ForCausalLM", "qkv")}


def exporter(cfg):
    """The architecture that computes `cfg`'s model exactly, or ConversionError saying why none does."""
    m = cfg.model
    if m.mlp == "swiglu":
        if m.linear_bias == "all":
            raise ConversionError("model.linear_bias=all with model.mlp=swiglu: Llama has no linear biases and Qwen2"
                                  " biases on q, k, v only (model.linear_bias none or qkv)")
        return ARCHITECTURES["llama" if m.linear_bias == "none" else "qwen2"]
    expressible(cfg)
    return NeoX


# ---- command line --------------------------------------------------------------------------------------

def export_main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pause-megatron export-hf", description=export.__doc__)
    ap.add_argument("checkpoint", help="a checkpoint root (its `latest`) or iteration directory, any TP/PP layout")
    ap.add_argument("out_dir", help="the model directory to create (must not exist)")
    ap.add_argument("--gelu", choices=sorted(GELU),
                    help="only for a checkpoint saved before model.gelu existed (others record it): exact or tanh "
                         "(default) GELU")
    args = ap.parse_args(argv)
    from pause_megatron.config import ConfigError
    from pause_megatron.tokenizer import TokenizerMismatch

    try:
        export(args.checkpoint, args.out_dir, gelu=args.gelu)
    except (ConversionError, ConfigError, TokenizerMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}")
    return 0


def import_main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pause-megatron import-hf", description=import_.__doc__)
    ap.add_argument("hf_dir", help="a GPT-NeoX, Llama or Qwen2 model directory (config.json, safetensors, "
                                   "tokenizer.model or tokenizer.json)")
    ap.add_argument("out_checkpoint", help="the checkpoint root to create (must not exist)")
    ap.add_argument("--seq-length", type=int,
                    help=f"model.seq_length (default: max_position_embeddings, at most {DEFAULT_SEQ_LENGTH})")
    args = ap.parse_args(argv)
    from pause_megatron.config import ConfigError
    from pause_megatron.tokenizer import TokenizerMismatch

    try:
        out = import_(args.hf_dir, args.out_checkpoint, seq_length=args.seq_length)
    except (ConversionError, ConfigError, TokenizerMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = checkpoint_model_overrides(out)
    print(f"wrote {out}\nmodel overrides for pretraining from it: {' '.join(m)}")
    return 0


def checkpoint_model_overrides(root: str) -> list[str]:
    """model.* overrides that give a run the model of the checkpoint at `root` (config.ARCHITECTURE_KEYS and
    seq_length): what pretraining from it needs (finetuning reads them from the checkpoint)."""
    from pause_megatron import checkpoint
    from pause_megatron.config import model_overrides

    return model_overrides(checkpoint.read_extra(root)["config"]["model"])
