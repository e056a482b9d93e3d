"""Batched against one-at-a-time evaluation through lm-eval's own requests, on one checkpoint (run by the tests).

Prints one JSON object per request kind: multiple choice (piqa, hellaswag: lm-eval's loglikelihood requests),
generation with stop strings (nq_open, gsm8k, lambada: generate_until, lm-eval's stop strings and one more
per request), rolling log-likelihood (texts of
several windows). Each holds the batch-1 and the batched answers, likelihoods also each request scored on its
own outside the adapter from the logits of every position (`full_logits_logprob`); generation also the reference the
stop-aware decoder must reproduce (every row decoded to max_gen_toks at batch 1, then cut at its `until`
strings) and how many rows a stop string ended early.
"""

import argparse
import json

import torch

from pause_megatron import runtime
from pause_megatron import cpu_emulation
from pause_megatron.decoding import greedy_generate, greedy_pick
from pause_megatron.evaluate import load_for_inference, make_lm

M = 2  # pauses


class Counter:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.module, self.calls, self.positions = model, 0, 0  # `module`: how decoding finds the GPTModel

    def __call__(self, **kwargs):
        self.calls += 1
        self.positions += kwargs["input_ids"].numel()
        return self.module(**kwargs)


@torch.no_grad()
def full_logits_logprob(model, context, continuation, **pick):
    """(log-likelihood, is greedy) from the logits of every position: the reference for `logits_only_at`."""
    ids = torch.tensor([context + continuation])
    with cpu_emulation.without_device_rewrites():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], attention_mask=None)
    picked = logits[0].float()[len(context) - 1: len(context) - 1 + len(continuation)]
    logprobs = torch.log_softmax(picked, -1)
    target = torch.tensor(continuation)
    # greedy as generation picks: on the logits
    return float(logprobs.gather(1, target[:, None]).sum()), bool((greedy_pick(picked, **pick) == target).all())


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
    before = {name: c.positions for name, c in counters.items()}
    out["multiple_choice"] = {name: [list(r) for r in lm.loglikelihood(mc, disable_tqdm=True)]
                              for name, lm in lms.items()}
    # positions the model computed, against every request's context and continuation once each
    out["multiple_choice"]["positions"] = {name: counters[name].positions - before[name] for name in lms}
    out["multiple_choice"]["positions"]["rows"] = sum(
        len(lms["single"].prompt(c, len(x))) + len(x) for c, x in (tok.encode_pair(*inst.args) for inst in mc))
    out["multiple_choice"]["contexts"] = len({inst.args[0] for inst in mc})
    # and each request scored on its own, outside the adapter's batching and ordering
    single = lms["single"]
    out["multiple_choice"]["direct"] = []
    for inst in mc:
        ctx, cont = tok.encode_pair(*inst.args)
        out["multiple_choice"]["direct"].append(
            list(full_logits_logprob(model, single.prompt(ctx, len(cont)), cont, **single.decode_kwargs)))

    # Requests whose continuation is the model's own greedy output (1-4 tokens): is_greedy must come out True
    rows = []
    for i, inst in enumerate(mc[:8]):
        ctx, _ = tok.encode_pair(*inst.args)
        n = 1 + i % 4
        cont = greedy_generate(model, single.prompt(ctx, n), max_new_tokens=n, stop_ids=(tok.eod_id,),
                               **single.decode_kwargs)
        rows.append((None, ctx, cont or [tok.eod_id]))
    out["greedy_continuations"] = {name: [list(r) for r in lm._loglikelihood_tokens(rows)] for name, lm in lms.items()}
    out["greedy_continuations"]["direct"] = [list(full_logits_logprob(model, single.prompt(c, len(x)), x,
                                                                      **single.decode_kwargs)) for _, c, x in rows]

    gen = [inst for t in ("nq_open", "gsm8k", "lambada") for inst in requests(t, args.data_dir)]
    for i, inst in enumerate(gen):  # short generations keep the test fast; rows of one batch differ in length
        inst.arguments = (inst.args[0], {**inst.args[1], "max_gen_toks": args.max_gen_toks - 6 * (i % 3)})
    reference, early, expected_calls = [], 0, 0
    for i, inst in enumerate(gen):
        context, kw = inst.args
        max_new = kw["max_gen_toks"]
        ids = greedy_generate(counters["reference"], single.prompt(tok.encode(context), max_new),
                              max_new_tokens=max_new, stop_ids=(tok.eod_id,), **single.decode_kwargs)
        full = tok.decode(ids)
        until = list(kw["until"])
        # lm-eval's stop strings rarely occur in a random model's text: every other request also stops at the two
        # characters on either side of a token boundary mid-answer (a stop string only the growing text holds,
        # not any one token), so that rows end early at different steps; the others run to their max_gen_toks.
        j = len(ids) // 2
        head, longer = tok.decode(ids[:j]), tok.decode(ids[: j + 1])
        if i % 2 == 0 and head and longer.startswith(head) and len(longer) > len(head):
            until.append(head[-1] + longer[len(head)])
        inst.arguments = (context, {**kw, "until": until})
        cut = single._cut(full, [s for s in until if s])
        early += cut != full
        reference.append(cut)
        # batch 1 runs one forward per generated token, up to the first that puts a stop string in the text,
        # plus the one that picked EOD
        stop_at = next((k for k in range(1, len(ids) + 1) if any(s and s in tok.decode(ids[:k]) for s in until)), None)
        expected_calls += stop_at if stop_at is not None else len(ids) + (len(ids) < max_new)
    before = {name: c.calls for name, c in counters.items()}
    out["generation"] = {name: lm.generate_until(gen, disable_tqdm=True) for name, lm in lms.items()}
    out["generation"]["forward_calls"] = {"reference": before["reference"], "expected_single": expected_calls,
                                          **{k: counters[k].calls - before[k] for k in lms}}
    out["generation"]["max_gen_toks"] = sorted({inst.args[1]["max_gen_toks"] for inst in gen})
    out["generation"]["reference"] = reference
    out["generation"]["stopped_early"] = early

    from lm_eval.api.instance import Instance

    texts = ["The river runs past the mountains and the city. " * k for k in (1, 9, 3, 20)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    out["rolling"] = {name: lm.loglikelihood_rolling(rolling, disable_tqdm=True) for name, lm in lms.items()}
    w = cfg.model.seq_length - 1
    out["rolling"]["direct"] = [sum(full_logits_logprob(model, [tok.eod_id], ids[i: i + w])[0]
                                    for i in range(0, len(ids), w)) for ids in map(tok.encode, texts)]
    out["rolling"]["windows"] = [-(-len(tok.encode(t)) // (cfg.model.seq_length - 1)) for t in texts]
    print("BATCHED " + json.dumps(out), flush=True)
    runtime.destroy()


if __name__ == "__main__":
    main()
