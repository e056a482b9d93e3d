"""Checks of the evaluation adapter and the finetuning loss on one checkpoint (run by the tests).

Prints one JSON object: the adapter's log-likelihood and a direct forward pass with the pauses in place,
KV-cached and recomputed greedy generations with the largest difference of their per-step logits, and
finetuning losses with a prompt label / a target label changed.
"""

import argparse
import json

import torch
import torch.nn.functional as F

from pause_megatron import checkpoint, runtime
from pause_megatron.data import FinetuneDataset, collate
from pause_megatron.decoding import greedy_generate
from pause_megatron.evaluate import load_for_inference, make_lm
from pause_megatron.tasks import get_task, load_split
from pause_megatron.train import build_train_state, eval_step

M = 4  # pauses for these checks


class Recorder:
    """The model as greedy_generate calls it, keeping the last position's logits of every call."""

    def __init__(self, model):
        self.model, self.last_logits = model, []

    def __call__(self, **kwargs):
        logits = self.model(**kwargs)
        self.last_logits.append(logits[0, -1].detach().float().clone())
        return logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()
    model, cfg, tok = load_for_inference(args.checkpoint)
    out = {}

    # 1. Likelihood through lm-eval's request path vs a direct forward pass with the pauses in place.
    from lm_eval.api.instance import Instance

    lm = make_lm(model, tok, m_inf=M, max_length=cfg.model.seq_length, device=torch.device("cpu"))
    context, continuation = "Question: How do you keep shells dry?\nAnswer:", " Put the shells in a dry box."
    (adapter_ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    ctx_ids = tok.encode(context)
    cont_ids = tok.encode(context + continuation)[len(ctx_ids):]
    ids = torch.tensor([ctx_ids + [tok.pause_id] * M + cont_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], attention_mask=None).float()
    logp = F.log_softmax(logits[0], -1)
    start = len(ctx_ids) + M
    direct = sum(float(logp[start - 1 + i, t]) for i, t in enumerate(cont_ids))
    out["loglikelihood"] = {"adapter": adapter_ll, "direct": direct}

    # 2. Greedy generation with and without the KV cache: the tokens, and the logits each step decided on.
    prompts = [tok.encode("Q: what is the capital of peru?\nA:") + [tok.pause_id] * M, tok.encode("The river"),
               [tok.eod_id]]
    out["generation"] = []
    for p in prompts:
        cached, recomputed = Recorder(model), Recorder(model)
        g = {"cached": greedy_generate(cached, p, max_new_tokens=40),
             "recomputed": greedy_generate(recomputed, p, max_new_tokens=40, use_cache=False)}
        steps = min(len(cached.last_logits), len(recomputed.last_logits))
        diff = torch.stack(cached.last_logits[:steps]) - torch.stack(recomputed.last_logits[:steps])
        g["max_logit_diff"] = float(diff.abs().max())
        g["logit_scale"] = float(torch.stack(recomputed.last_logits).std())
        out["generation"].append(g)

    # 3. The finetuning loss (the real train-step loss function) ignores prompt and pause labels.
    task = get_task("squad")
    pairs = [pair for doc in load_split(task, part="train", data_dir=args.data_dir) for pair in task.examples(doc)]
    ds = FinetuneDataset(pairs[:2], tokenizer=tok, seq_length=cfg.model.seq_length, m=M, placement="append",
                         filler_id=None, seed=0, where="squad")
    state = build_train_state(cfg, vocab_size=model.vocab_size, cuda=False)
    checkpoint.load(state, args.checkpoint, weights_only=True)
    sample = ds[0]
    targets = sample["loss_mask"].nonzero().flatten()
    pause_label = int((sample["labels"] == tok.pause_id).nonzero().flatten()[0])
    prompt_label = 3  # well inside the prompt

    def loss_with(position=None):
        s = {k: v.clone() for k, v in sample.items()}
        if position is not None:
            s["labels"][position] = (s["labels"][position] + 7) % tok.vocab_size
        return eval_step(state, [collate([s], pause_id=tok.pause_id)])["loss"]

    out["finetune_loss"] = {"original": loss_with(), "prompt_label_changed": loss_with(prompt_label),
                            "pause_label_changed": loss_with(pause_label),
                            "target_label_changed": loss_with(int(targets[0])),
                            "target_positions": targets.tolist(), "pause_position": pause_label}
    print("PROBE " + json.dumps(out), flush=True)
    runtime.destroy()


if __name__ == "__main__":
    main()
