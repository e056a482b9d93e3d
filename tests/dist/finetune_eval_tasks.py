"""Finetune then evaluate several tasks in one process, through the two command lines' own `main` (run by the tests).

`python -m pause_megatron.finetune` and `python -m pause_megatron.evaluate` are `finetune.main(argv)` and
`evaluate.main(argv)` behind a process start; each tears its process group down when it ends. Calling them in
turn here gives every task the same finetuning and evaluation as the two commands, with one Python, torch,
Megatron and lm-eval start-up for all the tasks instead of two to three per task (several seconds each on a
loaded 2-core machine). Prints one line per task: `TASK {"task", "finetune", "evaluate", "error"}` (exit codes;
the traceback of an exception, after which the next task starts from a torn-down process group).
"""

import argparse
import json
import os
import traceback

from pause_megatron import evaluate, finetune, runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--out", required=True, help="<out>/<task>/checkpoints and <out>/<task>/eval.json")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--limit", required=True)
    ap.add_argument("overrides", nargs="*", help="finetuning overrides")
    args = ap.parse_args()
    for task in args.tasks.split(","):
        out = os.path.join(args.out, task)
        result = {"task": task, "finetune": None, "evaluate": None, "error": None}
        try:
            result["finetune"] = finetune.main([f"task={task}", f"train.init_from={args.pretrained}",
                                                f"train.output_dir={out}", *args.overrides])
            if result["finetune"] == 0:
                result["evaluate"] = evaluate.main(
                    ["--checkpoint", os.path.join(out, "checkpoints"), "--tasks", task, "--data-dir", args.data_dir,
                     "--limit", args.limit, "--output", os.path.join(out, "eval.json"), "tracking.enabled=false"])
        except BaseException:  # noqa: BLE001  (SystemExit too: reported for this task, the next one still runs)
            result["error"] = traceback.format_exc()
            runtime.destroy()
        print("TASK " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
