"""Evaluation with lm-eval: the Megatron model behind a `TemplateLM`, with M_inf pauses in every request.

`python -m pause_megatron.evaluate --checkpoint runs/ft_squad/checkpoints --tasks squad [--data-dir D]
    [pauses.m_inf=10 pauses.placement=append] [--limit N] [--batch-size N|auto] [--output results.json]`

The checkpoint (any TP/PP layout) is loaded at TP=1, PP=1 through dist_checkpointing's resharding; with
several processes, lm-eval splits the requests across them (data parallel) and `--output` gathers every
rank's generations. Every request gets the pauses placed on its encoded context (`PauseLM.prompt`); requests
are scored and generated in batches (`pause_megatron.decoding`: greedy decoding with Megatron-Core's KV cache,
each row stopping at EOD, its `until` strings or `max_gen_toks`, never emitting a padded id or `<pause>`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch

from pause_megatron.decoding import (AUTO_BATCH_START, BatchSize, generate, parse_batch_size, run_batched, score_batch,
                                     score_shared, shares_contexts)
from pause_megatron.pauses import fit_placed, place_pauses
from pause_megatron.tokenizer import PauseTokenizer


# ---- the lm-eval adapter ---------------------------------------------------------------------------------

def _make_lm_class():
    from lm_eval.api.model import TemplateLM

    class PauseLM(TemplateLM):
        """A Megatron GPTModel for lm-eval, placing M_inf pauses after every context.

        Contexts and continuations are split by `PauseTokenizer.encode_pair` (lm-eval's rule, which finetuning
        targets follow too); the pauses are placed when a request is scored, after the context is cut to fit
        the window by `pauses.fit_placed` (finetuning's truncation rule). Decoding never emits `<pause>`: in the
        paper the outputs are read after the last pause, where a pause has no meaning, and pretraining and
        finetuning never train the model to predict one.
        """

        def __init__(self, model, tokenizer: PauseTokenizer, *, m_inf: int, placement: str = "append",
                     filler_id: Optional[int] = None, max_length: int, device: torch.device,
                     batch_size: BatchSize = 1):
            super().__init__()
            self.model, self.tok = model, tokenizer
            self.m_inf, self.placement, self.filler_id = m_inf, placement, filler_id
            self.max_length, self._device = max_length, device
            self.batch_size = parse_batch_size(batch_size)
            self.decode_kwargs = {"vocab_size": tokenizer.vocab_size, "banned_ids": (tokenizer.pause_id,)}
            # the longest continuation that leaves room for the pauses and one context token
            self.max_continuation = max_length - 1 - len(self.with_pauses([]))
            if self.max_continuation < 1:
                raise ValueError(f"{m_inf} pauses leave no room for a continuation in {max_length} tokens")
            self._rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

        def with_pauses(self, ids: list[int]) -> list[int]:
            return place_pauses(ids, m=self.m_inf, pause_id=self.tok.pause_id, placement=self.placement,
                                filler_id=self.filler_id)

        @property
        def eot_token_id(self) -> int:
            return self.tok.eod_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tok.encode(string)

        def tok_decode(self, ids, **kwargs) -> str:
            return self.tok.decode(ids)

        def _encode_pair(self, context: str, continuation: str):
            return self.tok.encode_pair(context, continuation)

        def prompt(self, context: list[int], room: int) -> list[int]:
            """The model's input: the context with M_inf pauses placed, leaving `room` tokens of the window free.

            The context is cut from the left, the pauses kept (`fit_placed`, as finetuning cuts its prompts).
            An empty context becomes EOD (a document boundary), so that there is a position to predict from.
            """
            return fit_placed(context or [self.eot_token_id], m=self.m_inf, pause_id=self.tok.pause_id,
                              placement=self.placement, filler_id=self.filler_id,
                              max_length=self.max_length - min(room, self.max_continuation))

        def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(log-likelihood, is greedy) of each (model input, continuation), batched longest first.

            In batches (where the attention allows, `shares_contexts`), a batch item is a context with all its
            continuations (a multiple-choice question's endings), its context computed once (`score_shared`);
            `batch_size` then counts contexts, as lm-eval's HF backend counts them when it groups by context.
            One context with all its continuations that does not fit is scored one row at a time.
            """
            kwargs = dict(device=self._device, pad_id=self.tok.pad_id, **self.decode_kwargs)
            if self.batch_size == 1 or not shares_contexts(self.model):
                return run_batched(rows, lambda chunk: score_batch(self.model, chunk, **kwargs), self.batch_size,
                                   sort_key=lambda r: (-len(r[0]) - len(r[1]), tuple(r[0] + r[1])))
            by_context: dict = {}
            for i, (context, _) in enumerate(rows):  # a one-token context (rolling windows: EOD) has nothing to share
                by_context.setdefault(tuple(context) if len(context) > 1 else i, []).append(i)
            groups = [(rows[idx[0]][0], [rows[i][1] for i in idx]) for idx in by_context.values()]
            scored = run_batched(groups, lambda chunk: score_shared(self.model, chunk, **kwargs), self.batch_size,
                                 sort_key=lambda g: (-len(g[0]) - max(map(len, g[1])), tuple(g[0])),
                                 split=lambda g: [score_batch(self.model, [(g[0], x)], **kwargs)[0] for x in g[1]])
            out: list = [None] * len(rows)
            for idx, results in zip(by_context.values(), scored):
                for i, result in zip(idx, results):
                    out[i] = result
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # lm-eval passes disable=False to its "Tokenizing inputs" bar, over TQDM_DISABLE: off in a log here
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not sys.stderr.isatty())

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            rows = []
            for _, context, continuation in requests:
                continuation = continuation[-self.max_continuation:]
                rows.append((self.prompt(context, len(continuation)), continuation))
            return self._score(rows)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            rows, owner = [], []
            for i, (string,) in enumerate(r.args for r in requests):
                ids, start = self.tok.encode(string), 0
                while start < len(ids):  # disjoint windows, each conditioned on EOD
                    chunk = ids[start : start + self.max_length - 1]
                    rows.append(([self.eot_token_id], chunk))
                    owner.append(i)
                    start += len(chunk)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owner, self._score(rows)):  # summed in window order, as one at a time
                totals[i] += ll
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            rows = []
            for request in requests:
                context, gen_kwargs = request.args
                until = gen_kwargs.get("until", [])
                until = [s for s in ([until] if isinstance(until, str) else until) if s]
                max_new = int(gen_kwargs.get("max_gen_toks", 64))
                rows.append((self.prompt(self.tok.encode(context), max_new), max_new, until))

            def run(chunk):
                def stop(b, ids):  # a stop string in the text so far ends the row
                    text = self.tok.decode(ids)
                    return any(s in text for s in chunk[b][2])

                ids = generate(self.model, [r[0] for r in chunk], max_new_tokens=[r[1] for r in chunk],
                               stop_ids=(self.tok.eod_id,), stop=stop, device=self._device, **self.decode_kwargs)
                return [self._cut(self.tok.decode(g), r[2]) for g, r in zip(ids, chunk)]

            return run_batched(rows, run, self.batch_size, sort_key=lambda r: (-len(r[0]), tuple(r[0])))

        @staticmethod
        def _cut(text: str, until: list[str]) -> str:
            for stop in until:
                if stop in text:
                    text = text[: text.index(stop)]
            return text

        # Data-parallel evaluation: lm-eval splits requests by rank and gathers through these.
        def all_gather(self, tensor):
            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj, dst=0):
            parts = [None] * self._world_size if self._rank == dst else None
            torch.distributed.gather_object(obj, parts, dst=dst)
            return parts

        def barrier(self):
            torch.distributed.barrier()

    return PauseLM


def make_lm(model, tokenizer, **kwargs):
    """A PauseLM instance (lm-eval is imported only when evaluation is used)."""
    return _make_lm_class()(model, tokenizer, **kwargs)


# ---- loading a checkpoint for evaluation -----------------------------------------------------------------

def load_for_inference(checkpoint_path: str, overrides: list[str] = ()):
    """(model, cfg, tokenizer) from a checkpoint of any layout, rebuilt at TP=1, PP=1 on this process."""
    from pause_megatron import checkpoint, runtime
    from pause_megatron.config import load_config
    from pause_megatron.model import build_gpt, kernel_summary, prepare_chunks
    from pause_megatron.tokenizer import padded_vocab_size

    extra = checkpoint.read_extra(checkpoint_path)
    base = dict(extra.get("config") or {})
    base["parallel"] = {"tensor": 1, "pipeline": 1, "virtual_pipeline": None, "sequence_parallel": False}
    base.pop("task", None)
    # No world_size: the training batch split (global batch vs micro batch x data parallel) does not apply to
    # inference, where lm-eval splits the requests over any number of ranks.
    cfg = load_config(None, list(overrides), base=base)
    tokenizer = PauseTokenizer.load(checkpoint.tokenizer_path(checkpoint_path))
    p = cfg.pauses
    if p.placement in ("append", "prepend") and (p.m_inf if p.m_inf is not None else p.m_ft) > 0:
        tokenizer.require_pause(why=f"evaluation asks for pauses (placement {p.placement})")
    tokenizer.check_matches(extra, where=checkpoint_path)
    runtime.init_distributed(cfg)
    cuda = runtime.use_cuda()
    vocab = padded_vocab_size(tokenizer.vocab_size, divisible_by=cfg.model.make_vocab_size_divisible_by)
    model = prepare_chunks([build_gpt(cfg, vocab_size=vocab, cuda=cuda)], cuda=cuda)[0]  # Float16Module in bf16
    checkpoint.load_model([model], checkpoint_path)
    model.eval()
    if torch.distributed.get_rank() == 0:
        print(kernel_summary(cfg, cuda=cuda), flush=True)
    return model, cfg, tokenizer


def evaluate_tasks(model, cfg, tokenizer, *, tasks: list[str], data_dir: Optional[str], limit: Optional[int] = None,
                   m_inf: Optional[int] = None, batch_size: BatchSize = 1) -> tuple[dict, list[dict]]:
    """Run lm-eval on `tasks` with M_inf pauses; returns ({task: {metric: value}}, {task: per-request records}).

    Both only on rank 0, gathered from every rank. A record is the document id, the request arguments and the
    model's responses (log-likelihood and greedy flag, or the generated text).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pause_megatron.runtime import device
    from pause_megatron.tasks import get_task, lm_eval_config

    p = cfg.pauses
    m = m_inf if m_inf is not None else (p.m_inf if p.m_inf is not None else p.m_ft)
    filler_id = tokenizer.piece_id(p.filler) if p.placement == "filler" else None
    lm = make_lm(model, tokenizer, m_inf=m, placement=p.placement, filler_id=filler_id,
                 max_length=cfg.model.seq_length, device=device(), batch_size=batch_size)
    configs = [lm_eval_config(get_task(t), data_dir=data_dir) for t in tasks]
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(), limit=limit,
                                  num_fewshot=0, log_samples=True, bootstrap_iters=0)
    scores, records = {}, {}
    if out is not None:  # only rank 0 gets results
        for t in tasks:
            raw = out["results"][f"pause_{t}"]
            scores[t] = {k.split(",")[0]: v for k, v in raw.items() if "," in k and not k.split(",")[0].endswith("stderr")}
            # The report's intervals: how many documents stand behind the score, and its per-document spread.
            samples = out["samples"][f"pause_{t}"]
            metric = get_task(t).metric
            per_doc = [float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float))]
            scores[t]["n"] = len(samples)
            if len(per_doc) > 1:
                scores[t][f"{metric}_sd"] = statistics.stdev(per_doc)
            records[t] = [{"doc_id": s["doc_id"], "arguments": [list(a) for a in s["arguments"]],
                           "resps": [list(r[0]) if isinstance(r[0], tuple) else r[0] for r in s["resps"]]}
                          for s in out["samples"][f"pause_{t}"]]
    return scores, records


def _stop_on_signal() -> None:
    """SIGUSR1/SIGTERM (Slurm's time-limit warning, a preemption): stop with exit 75 so that the job is requeued.

    An evaluation keeps nothing between requests, so there is nothing to save: the requeued job starts it again.
    """
    import signal

    from pause_megatron.job import EXIT_STOPPED

    from pause_megatron.stop_signals import write_stop_file

    def handler(signum, frame):
        print(f"evaluation stopped by {signal.Signals(signum).name}: exit {EXIT_STOPPED} (run again to redo it)",
              file=sys.stderr, flush=True)
        write_stop_file("")  # nothing saved: run_step requeues it only a few times (PAUSE_MAX_REQUEUES)
        os._exit(EXIT_STOPPED)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint root (its `latest`) or iteration directory")
    ap.add_argument("--tasks", help="comma-separated task names (also accepted as tasks=a,b)")
    ap.add_argument("--data-dir", help="offline task data: <dir>/<task>/eval.jsonl")
    ap.add_argument("--limit", type=int, help="evaluate only the first N documents of each task")
    ap.add_argument("--batch-size", default="1", help="requests per forward pass (multiple choice: contexts, "
                    f"each with its continuations): N, or auto (the largest that fits, from {AUTO_BATCH_START}, halved "
                    "while memory runs out); the answers do not depend on it")
    ap.add_argument("--output", help="write the scores (and every request's arguments and responses) to this JSON file")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pauses.m_inf=10 pauses.placement=append")
    from pause_megatron.job import add_tracking_args, tags_from

    add_tracking_args(ap)
    args = ap.parse_args(argv)
    _stop_on_signal()
    started = time.perf_counter()
    overrides = [o for o in args.overrides if not o.startswith("tasks=")]
    tasks_arg = args.tasks or next((o.split("=", 1)[1] for o in args.overrides if o.startswith("tasks=")), None)

    from pause_megatron import runtime
    from pause_megatron.config import ConfigError
    from pause_megatron.tasks import TaskDataError, UnknownTask, get_task, load_examples, warn_if_overlapping
    from pause_megatron.tokenizer import TokenizerMismatch

    try:
        if not tasks_arg:
            raise ConfigError("--tasks is required (e.g. --tasks squad,gsm8k)")
        try:
            batch_size = parse_batch_size(args.batch_size)
        except ValueError as exc:
            raise ConfigError(f"--batch-size: {exc}") from None
        tasks = [t.strip() for t in tasks_arg.split(",") if t.strip()]
        for t in tasks:  # unknown names and malformed rows fail before the model is loaded
            evaluation = load_examples(get_task(t), part="eval", data_dir=args.data_dir)
            # Offline rows: warn when eval prompts are also train prompts (the hub's splits are the datasets' own).
            train_file = get_task(t).local_file(args.data_dir, "train") if args.data_dir else None
            if train_file and os.path.exists(train_file) and runtime.dist_env().rank == 0:
                warn_if_overlapping(get_task(t), load_examples(get_task(t), part="train", data_dir=args.data_dir),
                                    evaluation, where=args.data_dir)
        model, cfg, tokenizer = load_for_inference(args.checkpoint, overrides)
    except (ConfigError, UnknownTask, TaskDataError, TokenizerMismatch, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, UnknownTask) else exc}", file=sys.stderr)
        return 2

    scores, samples = evaluate_tasks(model, cfg, tokenizer, tasks=tasks, data_dir=args.data_dir,
                                     limit=args.limit, batch_size=batch_size)
    if torch.distributed.get_rank() == 0:
        m_inf = cfg.pauses.m_inf if cfg.pauses.m_inf is not None else cfg.pauses.m_ft
        report = {"checkpoint": args.checkpoint, "m_inf": m_inf, "placement": cfg.pauses.placement,
                  "scores": scores}
        print(json.dumps(report), flush=True)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump({**report, "samples": samples}, f, indent=1)
        # The scores are written: a stop signal now only waits for the MLflow run (made here, seconds) to end
        # instead of leaving it RUNNING.
        import signal

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: print(f"{signal.Signals(signum).name} after the scores were "
                                                           "written: finishing", file=sys.stderr, flush=True))
        _track(cfg, report, args.output, tags=tags_from(args), parent_run_id=args.parent_run_id,
               wall_s=time.perf_counter() - started)
    runtime.destroy()
    return 0


def _track(cfg, report: dict, output: Optional[str], *, tags: dict, parent_run_id: Optional[str],
           wall_s: float) -> None:
    from pause_megatron.config import flat_dict
    from pause_megatron.tracking import Tracker

    tracker = Tracker(cfg.tracking, enabled=True)
    tracker.start(params={**flat_dict(cfg), "checkpoint": report["checkpoint"]},
                  tags={"stage": "evaluate", "m_inf": str(report["m_inf"]), "placement": report["placement"],
                        "tasks": ",".join(report["scores"]), **tags}, parent_run_id=parent_run_id)
    tracker.log_metrics({f"{task}/{k}": v for task, vals in report["scores"].items() for k, v in vals.items()
                         if isinstance(v, (int, float))} | {"perf/wall_s": wall_s}, step=0)
    if output:
        tracker.log_artifact(output)
    tracker.end()


if __name__ == "__main__":
    sys.exit(main())
