"""Batched, stop-aware evaluation against one request at a time, and finetuning's padding, side by side.

    python benchmarks/bench_eval_batch.py [--batch-size 16] [--requests 256] [--max-gen-toks 256] [k=v overrides]

Evaluation (tiny preset, random weights: speed does not depend on them; one process, arms alternated, best
of --repeats):
  * multiple choice: contexts of 40-200 tokens with 4 continuations of 5-40 tokens each (HellaSwag's shape),
    half of them random tokens, half the model's own greedy continuation (so greedy flags are True there),
    scored one request per forward with logits at every position (before: `all_logits_score`), and with
    logits only at the continuations (`decoding.score_batch`) at batch 1 and in batches of --batch-size
    rows; and each context computed once for its 4 continuations (`decoding.score_shared`) in batches of the
    same rows (--batch-size / 4 contexts) and of --batch-size contexts (what `evaluate --batch-size` runs);
  * generation: prompts of 30-200 tokens; each row's answer ends after 5-60 tokens (a stop string, played by a
    stop callback at that length, as a GSM8K or nq_open answer ends at its `until`); before: one prompt at a
    time decoded to --max-gen-toks and cut afterwards; after: batched and stop-aware. The two mixed arms
    (batched without stops, stop-aware at batch 1) separate the two effects.
Scoring alone (`scoring`): the old log-softmax + `greedy_pick` against `decoding.score_rows` on the same logits,
for random targets and for greedy ones.
Finetuning padding: positions computed per target token at seq 2048 on the built-in task rows
(pause_megatron/sample_tasks, M_ft=10 appended, micro batch 4), padded to seq_length (before) and to the
microbatch's longest (after), with a SentencePiece model trained on those rows (--vocab-size).
Evaluation requests: lm-eval's own requests for every task on the built-in eval rows, tokenized likewise
with M_inf=10 appended: requests per document and model positions per request (multiple choice: context and
continuation; generation: prompt and max_gen_toks, an upper bound, rows stop at their `until` strings).
Prints one JSON object; `--write-rates` also writes the task figures to pause_megatron/measured_rates.json,
with the settings they were measured at (tokenizer size, M_ft, M_inf, micro batch, each task's max_gen_toks),
the dry-run's basis for finetuning and evaluation hours (`recipe run --dry-run`, docs/recipes.md).
"""

import argparse
import json
import os
import platform
import random
import time

import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.decoding import generate, run_batched, score_batch, score_shared
from pause_megatron.model import build_gpt

VOCAB = 32128


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


# What evaluation passes (evaluate.PauseLM.decode_kwargs): a 32,000-piece tokenizer, <pause> its next id, the
# table padded to VOCAB; greedy may not pick <pause> nor a padded id.
PICK = {"vocab_size": 32001, "banned_ids": (32000,)}


@torch.no_grad()
def all_logits_score(model, rows):
    """Scoring as it was before this work (evaluate.continuation_logprob at c03692a^): one request per forward,
    logits and a log-softmax at every position of the row, then the continuation's, greedy by `greedy_pick`."""
    from pause_megatron.decoding import forward, greedy_pick

    out = []
    for c, x in rows:
        ids = torch.tensor([c + x])
        logprobs = torch.log_softmax(forward(model, ids, torch.arange(ids.shape[1])[None])[0], -1)
        picked = logprobs[len(c) - 1: len(c) - 1 + len(x)]
        target = torch.tensor(x)
        greedy = greedy_pick(picked, **PICK)
        out.append((float(picked.gather(1, target[:, None]).sum()), bool((greedy == target).all())))
    return out


def scoring_rates(repeats=3):
    """Scoring alone, on logits [1408, VOCAB] (64 requests' continuation tokens) of random values: the old way
    (a log-softmax per continuation, `greedy_pick` on it) against `decoding.score_rows`, for random targets
    and for targets that are each position's greedy pick (every one takes score_rows's tie check)."""
    from pause_megatron.decoding import greedy_pick, score_rows

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1408, VOCAB, generator=gen) * 3

    def old(conts):
        out, k = [], 0
        for x in conts:
            logprobs = torch.log_softmax(logits[k: k + len(x)], -1)
            target = torch.tensor(x)
            out.append((float(logprobs.gather(1, target[:, None]).sum()),
                        bool((greedy_pick(logprobs, **PICK) == target).all())))
            k += len(x)
        return out

    out = {}
    for name, flat in (("random", torch.randint(0, 32000, (1408,), generator=gen).tolist()),
                       ("greedy", greedy_pick(logits, **PICK).tolist())):
        conts = [flat[k: k + 22] for k in range(0, len(flat), 22)]  # 64 continuations of 22 tokens
        best = {"old": float("inf"), "score_rows": float("inf")}
        for _ in range(repeats):
            best["old"] = min(best["old"], timed(lambda: old(conts), 1))
            best["score_rows"] = min(best["score_rows"], timed(lambda: score_rows(logits.clone(), conts, **PICK), 1))
        clone = timed(lambda: logits.clone(), repeats)  # score_rows consumes its logits: the copy is not its cost
        out[name] = {"old_cpu_s": best["old"], "score_rows_cpu_s": best["score_rows"] - clone,
                     "ratio": best["old"] / (best["score_rows"] - clone),
                     "same": [g for _, g in old(conts)] == [g for _, g in score_rows(logits.clone(), conts, **PICK)]}
    return out


def eval_rates(args):
    cfg = load_config(None, ["model.preset=tiny", f"model.seq_length={200 + args.max_gen_toks}", *args.overrides])
    runtime.init_distributed(cfg)
    model = build_gpt(cfg, vocab_size=VOCAB, cuda=False).eval()
    rng = random.Random(0)
    tok = lambda n: [rng.randrange(10, 32000) for _ in range(n)]  # noqa: E731
    mc = []
    for _ in range(args.requests // 4):
        ctx = tok(rng.randint(40, 200))
        mc += [(ctx, tok(rng.randint(5, 40))) for _ in range(4)]
    # Half the continuations are the model's own greedy text (a trained model's right answers often are):
    # scoring then takes its greedy-flag path on every one of their tokens, not only on random tokens.
    mine = list(range(0, len(mc), 2))
    picked = generate(model, [mc[i][0] for i in mine], max_new_tokens=[len(mc[i][1]) for i in mine], **PICK)
    for i, ids in zip(mine, picked):
        mc[i] = (mc[i][0], ids)
    prompts = [tok(rng.randint(30, 200)) for _ in range(args.requests // 4)]
    answer = [rng.randint(5, 60) for _ in prompts]
    key_mc = lambda r: (-len(r[0]) - len(r[1]), tuple(r[0] + r[1]))  # noqa: E731
    groups = [(mc[i][0], [x for _, x in mc[i: i + 4]]) for i in range(0, len(mc), 4)]

    def shared(contexts):
        out = run_batched(groups, lambda c: score_shared(model, c, **PICK), contexts,
                          sort_key=lambda g: (-len(g[0]) - max(map(len, g[1])), tuple(g[0])))
        return [r for rs in out for r in rs]
    key_gen = lambda r: (-len(r[0]), tuple(r[0]))  # noqa: E731

    def gen(batch_size, stop_aware):
        rows = [(p, a) for p, a in zip(prompts, answer)]

        def run(chunk):
            stop = (lambda b, ids: len(ids) >= chunk[b][1]) if stop_aware else None
            out = generate(model, [r[0] for r in chunk], max_new_tokens=args.max_gen_toks, stop=stop, **PICK)
            return [o[: r[1]] for o, r in zip(out, chunk)]  # cut at the "stop string"

        return run_batched(rows, run, batch_size, sort_key=key_gen)

    arms = {
        "mc_batch1_all_logits": lambda: run_batched(mc, lambda c: all_logits_score(model, c), 1, sort_key=key_mc),
        "mc_batch1": lambda: run_batched(mc, lambda c: score_batch(model, c, **PICK), 1, sort_key=key_mc),
        "mc_batched": lambda: run_batched(mc, lambda c: score_batch(model, c, **PICK), args.batch_size,
                                          sort_key=key_mc),
        # each context once, its 4 continuations reading its KV cache: batches of the same 16 rows, and of
        # --batch-size contexts (what `evaluate --batch-size` does: it counts contexts)
        "mc_shared_same_rows": lambda: shared(max(1, args.batch_size // 4)),
        "mc_shared": lambda: shared(args.batch_size),
        "gen_batch1_full": lambda: gen(1, False),
        "gen_batched_stop": lambda: gen(args.batch_size, True),
        "gen_batch1_stop": lambda: gen(1, True),
        "gen_batched_full": lambda: gen(args.batch_size, False),
    }
    best = {k: float("inf") for k in arms}
    for _ in range(args.repeats):  # alternated: load on the machine hits every arm alike
        for name, fn in arms.items():
            best[name] = min(best[name], timed(fn, 1))
    n = {"mc": len(mc), "gen": len(prompts)}
    old_ll = run_batched(mc, lambda c: all_logits_score(model, c), 1, sort_key=key_mc)
    new_ll = run_batched(mc, lambda c: score_batch(model, c, **PICK), args.batch_size, sort_key=key_mc)
    mc_max_rel_diff = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(old_ll, new_ll))
    shared_ll = shared(args.batch_size)
    mc_shared_max_rel_diff = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(old_ll, shared_ll))
    rates = {f"{k}_requests_per_cpu_s": n[k.split("_")[0]] / v for k, v in best.items()}
    same_gen = gen(1, False) == gen(args.batch_size, True)
    runtime.destroy()
    return {**rates, "mc_speedup": best["mc_batch1_all_logits"] / best["mc_batched"],
            "mc_speedup_batching_only": best["mc_batch1"] / best["mc_batched"],
            "mc_speedup_selected_logits_only": best["mc_batch1_all_logits"] / best["mc_batch1"],
            "mc_speedup_shared": best["mc_batch1_all_logits"] / best["mc_shared"],
            "mc_speedup_shared_same_rows": best["mc_batch1_all_logits"] / best["mc_shared_same_rows"],
            # batching and sharing alone: today's scoring one request per forward against the shared batches
            "mc_speedup_shared_same_rows_vs_batch1": best["mc_batch1"] / best["mc_shared_same_rows"],
            "mc_max_rel_diff": mc_max_rel_diff, "mc_same_greedy": [a[1] for a in old_ll] == [b[1] for b in new_ll],
            "mc_shared_max_rel_diff": mc_shared_max_rel_diff,
            "mc_shared_same_greedy": [a[1] for a in old_ll] == [b[1] for b in shared_ll],
            "mc_greedy_requests": sum(a[1] for a in old_ll),
            "gen_speedup": best["gen_batch1_full"] / best["gen_batched_stop"],
            "gen_speedup_batching_only": best["gen_batch1_full"] / best["gen_batched_full"],
            "gen_speedup_stops_only": best["gen_batch1_full"] / best["gen_batch1_stop"],
            "same_generations": same_gen, "mc_requests": n["mc"], "gen_requests": n["gen"]}


def finetune_padding(args):
    from pause_megatron.data import FinetuneDataset, microbatches_from
    from pause_megatron.tasks import TASKS, get_task, load_examples
    from pause_megatron.tokenizer import train_tokenizer

    data_dir = os.path.join(os.path.dirname(__file__), "..", "pause_megatron", "sample_tasks")
    pairs = {t: load_examples(get_task(t), part="train", data_dir=data_dir) for t in sorted(TASKS)}
    texts = [s for ps in pairs.values() for pair in ps for s in pair]
    tok = train_tokenizer(texts, vocab_size=args.vocab_size)
    cfg = load_config(None, ["model.seq_length=2048", "train.micro_batch_size=4", "train.global_batch_size=4"])
    out = {}
    for task, ps in pairs.items():
        ds = FinetuneDataset(ps, tokenizer=tok, seq_length=2048, m=10, placement="append", filler_id=None,
                             seed=0, where=task)
        n = -(-len(ds) // 4) * 4  # whole microbatches (the last wraps into the next epoch, as training does)
        targets = computed = 0
        for start in range(0, n, 4):
            [mb] = microbatches_from(ds, start=start, cfg=cfg, pause_id=tok.pause_id, dp_rank=0, dp_size=1)
            targets += int(mb["loss_mask"].sum())
            computed += mb["tokens"].numel()
        out[task] = {"examples": len(ds), "before": n * 2048 / targets, "after": computed / targets,
                     "ratio": n * 2048 / computed, "positions_per_example": computed / n}
    return {"tokenizer_vocab": tok.vocab_size, "tasks": out}, tok


def eval_requests(tok, m_inf=10):
    """Per task: lm-eval's requests on the built-in eval rows, per document, and the positions each computes."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from pause_megatron.tasks import TASKS, get_task, lm_eval_config

    data_dir = os.path.join(os.path.dirname(__file__), "..", "pause_megatron", "sample_tasks")
    out = {}
    for name in sorted(TASKS):
        task = get_task_dict([lm_eval_config(get_task(name), data_dir=data_dir)], TaskManager())[f"pause_{name}"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        positions, gen_toks = 0, set()
        for inst in task.instances:
            if inst.request_type == "generate_until":
                context, kwargs = inst.args
                gen_toks.add(int(kwargs.get("max_gen_toks", 64)))
                positions += len(tok.encode(context)) + m_inf + int(kwargs.get("max_gen_toks", 64))
            else:
                context, continuation = tok.encode_pair(*inst.args)
                positions += len(context) + m_inf + len(continuation)
        docs = len({inst.doc_id for inst in task.instances})
        out[name] = {"kind": task.instances[0].request_type, "documents": docs,
                     "requests_per_doc": len(task.instances) / docs,
                     "positions_per_request": positions / len(task.instances),
                     "max_gen_toks": max(gen_toks) if gen_toks else None}
    return out


def write_rates(result, path):
    ft, ev = result["finetune_padding"], result["eval_requests"]
    rates = {
        "measured_by": "benchmarks/bench_eval_batch.py --write-rates (CPU; docs/performance.md)",
        "measured_on": f"{result['machine']}, {time.strftime('%Y-%m-%d')}",
        "tokenizer": f"SentencePiece trained on the built-in task rows, {ft['tokenizer_vocab']} pieces",
        "finetune": {"seq_length": 2048, "micro_batch_size": 4, "m_ft": 10,
                     "positions_per_example": {t: round(v["positions_per_example"], 2)
                                               for t, v in ft["tasks"].items()}},
        "tokenizer_vocab": ft["tokenizer_vocab"],
        "evaluate": {"m_inf": 10, "max_gen_toks": {t: v["max_gen_toks"] for t, v in ev.items() if v["max_gen_toks"]},
                     "tasks": {t: {"kind": v["kind"], "requests_per_doc": round(v["requests_per_doc"], 3),
                                                "positions_per_request": round(v["positions_per_request"], 2)}
                                            for t, v in ev.items()}},
    }
    with open(path, "w") as f:
        json.dump(rates, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--write-rates", action="store_true",
                    help="write the task figures to pause_megatron/measured_rates.json (the dry-run's basis)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads, torch {torch.__version__}",
              "load_average_1m_start": os.getloadavg()[0], "batch_size": args.batch_size}
    result["finetune_padding"], tok = finetune_padding(args)
    result["eval_requests"] = eval_requests(tok)
    result["scoring"] = scoring_rates()
    if not args.skip_eval:
        result["eval"] = eval_rates(args)
    result["load_average_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    if args.write_rates:
        from pause_megatron.perf import MEASURED_RATES

        write_rates(result, MEASURED_RATES)


if __name__ == "__main__":
    main()
