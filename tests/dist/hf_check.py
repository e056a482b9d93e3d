"""The Megatron model of a checkpoint (TP=1, PP=1, fp32) next to a transformers model directory: one JSON line.

    python tests/dist/hf_check.py --checkpoint CKPT --hf DIR [--texts texts.json]

Reports the largest logit difference on the tokenizer's real ids (all rows, and the same with the HF model's
GELU switched to the other form, exact or tanh, to show what the tolerance tells apart), both greedy continuations
of a few prompts (Megatron-Core's KV-cached decoding vs `generate`), and the texts whose ids differ between
the project's tokenizer and the exported one.
"""

import argparse
import json
import os

os.environ["PAUSE_MEGATRON_CPU"] = "1"

import torch  # noqa: E402

from pause_megatron import runtime  # noqa: E402
from pause_megatron.decoding import forward as _forward, greedy_generate  # noqa: E402
from pause_megatron.evaluate import load_for_inference  # noqa: E402
from pause_megatron.model import unwrap  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--checkpoint", required=True)
ap.add_argument("--hf", required=True)
ap.add_argument("--texts", help="a JSON list of texts to compare tokenizations on")
args = ap.parse_args()

model, cfg, tok = load_for_inference(args.checkpoint, ["precision.dtype=fp32", "pauses.m_inf=0"])
model = unwrap(model)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True, torch_dtype=torch.float32).eval()
has_tokenizer = os.path.exists(os.path.join(args.hf, "tokenizer_config.json"))
hf_tok = AutoTokenizer.from_pretrained(args.hf, local_files_only=True) if has_tokenizer else None
# Logits are compared over the ids both models have (an imported model has more: `<pause>`, padding).
n = min(tok.vocab_size, hf.config.vocab_size)

prompts = ["The model learns to think", "Rivers and mountains", "42 questions about"]
g = torch.Generator().manual_seed(0)
rows = [torch.randint(0, n, (cfg.model.seq_length,), generator=g).tolist() for _ in range(2)]
if tok.pause_id < n:
    rows.append(tok.encode(prompts[0]) + [tok.pause_id] * 5 + tok.encode(" answers"))
diffs, scale = [], 0.0
with torch.no_grad():
    for ids in rows:
        x = torch.tensor([ids])
        ref = _forward(model, x, torch.arange(len(ids)).unsqueeze(0))[0, :, :n]
        got = hf(x).logits[0, :, :n].float()
        diffs.append(float((ref - got).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    from transformers.activations import ACT2FN

    act = hf.config.hidden_act  # the same weights with the other GELU (exact <-> tanh approximation)
    for layer in hf.gpt_neox.layers:
        layer.mlp.act = ACT2FN["gelu" if act != "gelu" else "gelu_pytorch_tanh"]
    x = torch.tensor([rows[0]])
    other_gelu_diff = float((_forward(model, x, torch.arange(x.shape[1]).unsqueeze(0))[0, :, :n]
                             - hf(x).logits[0, :, :n]).abs().max())
    for layer in hf.gpt_neox.layers:
        layer.mlp.act = ACT2FN[act]

generations = []
for p in prompts:
    ids = tok.encode(p)
    ours = greedy_generate(model, ids, max_new_tokens=24, stop_ids=(tok.eod_id,), vocab_size=tok.vocab_size,
                           banned_ids=(tok.pause_id,))
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    if out and out[-1] == tok.eod_id:
        out = out[:-1]
    generations.append({"megatron": ours, "hf": out})

report = {"max_abs_diff": max(diffs), "logit_scale": scale, "other_gelu_diff": other_gelu_diff,
          "hidden_act": act,
          "generations": generations, "compared_vocab": n}
if hf_tok is None:
    print(json.dumps(report))
    runtime.destroy()
    raise SystemExit(0)
texts = json.load(open(args.texts)) if args.texts else []
mismatched = [t for t in texts if hf_tok.encode(t, add_special_tokens=False) != tok.encode(t)]
pause_text = "Question: why?" + "<pause>" * 3
# "<pause>" * M written between a context and its continuation (lm-eval's hf backend on a prompt that ends in
# pauses) must give the ids pause_megatron.evaluate gives: context ids, M pauses, the continuation's ids
# (contexts ending in whitespace excluded: evaluation moves that whitespace to the continuation, as lm-eval does)
pairs = [(t[:i], t[i:]) for t in texts if (i := t.find(" ", len(t) // 2)) > 0 and t[:i] == t[:i].rstrip()]
pause_mismatched = []
for ctx, cont in pairs:
    c, k = tok.encode_pair(ctx, cont)
    if hf_tok.encode(ctx + "<pause>" * 3 + cont, add_special_tokens=False) != c + [tok.pause_id] * 3 + k:
        pause_mismatched.append([ctx, cont])
print(json.dumps({
    **report, "texts": len(texts), "mismatched": mismatched[:5], "n_mismatched": len(mismatched),
    "pause_pairs": len(pairs), "pause_mismatched": pause_mismatched[:5], "n_pause_mismatched": len(pause_mismatched),
    "pause_id": tok.pause_id, "hf_pause_id": hf_tok.convert_tokens_to_ids("<pause>"),
    "pause_text_ids": hf_tok.encode(pause_text, add_special_tokens=False),
    "pause_text_expected": tok.encode("Question: why?") + [tok.pause_id] * 3,
    "hf_bos": hf_tok.bos_token_id, "hf_eos": hf_tok.eos_token_id, "eod_id": tok.eod_id, "hf_pad": hf_tok.pad_token_id, "pad_id": tok.pad_id,
    "decoded": hf_tok.decode(tok.encode(prompts[1])), "prompt": prompts[1],
}))
runtime.destroy()
