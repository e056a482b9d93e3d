"""Evaluation as `python -m pause_megatron.evaluate` runs it, recording what the model receives (run by the tests).

The checkpoint is loaded and evaluated through the same functions as the command line (`load_for_inference`
with the overrides, then `evaluate_tasks`), with the model behind a recorder of every input. Prints one JSON
object: M_inf as the config resolves it, the scores, and for each prompt the model decoded from (the first
call of each greedy generation: more than one token) the number of `<pause>` tokens at its end. With
`--m-inf 0,2,7`: one such object per value, each from a checkpoint loaded afresh with `pauses.m_inf=<value>`
added to the overrides (one process start-up for the whole sweep).
"""

import argparse
import json

from pause_megatron import runtime
from pause_megatron.evaluate import evaluate_tasks, load_for_inference


class Recorder:
    """The model, keeping the token ids of every call."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, **kwargs):
        self.inputs.append(kwargs["input_ids"][0].tolist())
        return self.model(**kwargs)


def trailing(ids: list[int], token: int) -> int:
    n = 0
    while n < len(ids) and ids[-1 - n] == token:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--limit", type=int, required=True)
    ap.add_argument("--m-inf", help="comma-separated pauses.m_inf values, one evaluation each")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    sweep = [[f"pauses.m_inf={m}"] for m in args.m_inf.split(",")] if args.m_inf else [[]]
    for extra in sweep:
        model, cfg, tok = load_for_inference(args.checkpoint, [*args.overrides, *extra])
        recorder = Recorder(model)
        scores, _ = evaluate_tasks(recorder, cfg, tok, tasks=args.tasks.split(","), data_dir=args.data_dir,
                                   limit=args.limit)
        prompts = [ids for ids in recorder.inputs if len(ids) > 1]
        p = cfg.pauses
        print("PROMPTS " + json.dumps({"m_inf": p.m_inf if p.m_inf is not None else p.m_ft, "scores": scores,
                                       "trailing_pauses": [trailing(ids, tok.pause_id) for ids in prompts]}),
              flush=True)
        runtime.destroy()


if __name__ == "__main__":
    main()
