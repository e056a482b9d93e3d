"""Batched against one-at-a-time evaluation through lm-eval's own requests, on one checkpoint (run by the tests).

Prints one JSON object per request kind: multiple choice (piqa, hellaswag: lm-eval's loglikelihood requests),
generation with stop strings (nq_open, gsm8k, lambada: generate_until, lm-eval's stop strings and one more
per request), rolling log-likelihood (texts of
several windows). Each holds the batch-1 and the batched answers, likelihoods also each request scored on its
own outside the adapter (`continuation_logprob`); generation also the reference the
stop-aware decoder must reproduce (every row decoded to max_gen_toks at batch 1, then cut at its `until`
strings) and how many rows a stop string ended early.
"""

import argparse
import json

import torch

from pause_megatron import runtime
from pause_megatron.decoding import continuation_logprob, greedy_generate
from pause_megatron.evaluate import load_for_inference, make_lm

M = 2  # pauses


class Counter:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, **kwargs):
        self.calls += 1
        return self.model(**kwargs)


def requests(task_name: str, data_dir: str):
    from lm_eval.tasks import TaskManager, get_task_dict

    from pause_megatron.tasks import get_task, lm_eval_config

    task = get_task_dict([lm_eval_config(get_task(task_name), data_dir=data_dir)], TaskManager())[f"pause_{task_name}"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return task.instances


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--batch-size", default="3")
    ap.add_argument("--max-gen-toks", type=int, default=24)
    ap.add_argument("--noise", type=float, default=5.0)
    args = ap.parse_args()
    model, cfg, tok = load_for_inference(args.checkpoint)
    # The tiny pretrained model says "ga ga ga" whatever it is given, which a decoder reading the wrong
    # positions would say too. Noise on its weights (`--noise` x each tensor's std, seeded) makes every output
    # depend on the whole context: a padding or position defect then changes the answers.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * (args.noise * float(p.float().std())))
    counters = {"single": Counter(model), "batched": Counter(model), "reference": Counter(model)}
    lms = {name: make_lm(counters[name], tok, m_inf=M, max_length=cfg.model.seq_length, device=torch.device("cpu"),
                         batch_size=size) for name, size in (("single", 1), ("batched", args.batch_size))}
    out = {}

    mc = [inst for t in ("piqa", "hellaswag") for inst in requests(t, args.data_dir)]
    out["multiple_choice"] = {name: [list(r) for r in lm.loglikelihood(mc, disable_tqdm=True)]
                              for name, lm in lms.items()}
    # and each request scored on its own, outside the adapter's batching and ordering
    single = lms["single"]
    out["multiple_choice"]["direct"] = []
    for inst in mc:
        ctx, cont = tok.encode_pair(*inst.args)
        out["multiple_choice"]["direct"].append(
            list(continuation_logprob(model, single.prompt(ctx, len(cont)), cont, **single.decode_kwargs)))

    gen = [inst for t in ("nq_open", "gsm8k", "lambada") for inst in requests(t, args.data_dir)]
    for inst in gen:  # short generations keep the test fast; the stop strings are lm-eval's
        inst.arguments = (inst.args[0], {**inst.args[1], "max_gen_toks": args.max_gen_toks})
    reference, early = [], 0
    for inst in gen:
        context, kw = inst.args
        full = tok.decode(greedy_generate(counters["reference"], single.prompt(tok.encode(context), kw["max_gen_toks"]),
                                          max_new_tokens=kw["max_gen_toks"], stop_ids=(tok.eod_id,),
                                          **single.decode_kwargs))
        # lm-eval's stop strings rarely occur in a random model's text: each request also stops at two
        # characters from the middle of its own full answer, so that rows end early at different steps
        until = [*kw["until"], full[len(full) // 2: len(full) // 2 + 2]]
        inst.arguments = (context, {**kw, "until": until})
        cut = single._cut(full, [s for s in until if s])
        early += cut != full
        reference.append(cut)
    before = {name: c.calls for name, c in counters.items()}
    out["generation"] = {name: lm.generate_until(gen, disable_tqdm=True) for name, lm in lms.items()}
    out["generation"]["forward_calls"] = {"reference": before["reference"],
                                          **{k: counters[k].calls - before[k] for k in lms}}
    out["generation"]["reference"] = reference
    out["generation"]["stopped_early"] = early

    from lm_eval.api.instance import Instance

    texts = ["The river runs past the mountains and the city. " * k for k in (1, 9, 3, 20)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    out["rolling"] = {name: lm.loglikelihood_rolling(rolling, disable_tqdm=True) for name, lm in lms.items()}
    w = cfg.model.seq_length - 1
    out["rolling"]["direct"] = [sum(continuation_logprob(model, [tok.eod_id], ids[i: i + w])[0]
                                    for i in range(0, len(ids), w)) for ids in map(tok.encode, texts)]
    out["rolling"]["windows"] = [-(-len(tok.encode(t)) // (cfg.model.seq_length - 1)) for t in texts]
    print("BATCHED " + json.dumps(out), flush=True)
    runtime.destroy()


if __name__ == "__main__":
    main()
