"""lm-eval's own `hf` backend on a transformers model directory, on the project's task configs: one JSON line
with the scores and every request's responses, shaped as `pause_megatron.evaluate --output` writes them.

    python tests/dist/hf_lm_eval.py --hf DIR --tasks piqa,nq_open --data-dir D --limit N
"""

import argparse
import json

import lm_eval
from lm_eval.tasks import TaskManager

from pause_megatron.tasks import get_task, lm_eval_config

ap = argparse.ArgumentParser()
ap.add_argument("--hf", required=True)
ap.add_argument("--tasks", required=True)
ap.add_argument("--data-dir", required=True)
ap.add_argument("--limit", type=int, required=True)
args = ap.parse_args()
tasks = args.tasks.split(",")
out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={args.hf},dtype=float32,device=cpu",
                              batch_size=1, tasks=[lm_eval_config(get_task(t), data_dir=args.data_dir) for t in tasks],
                              task_manager=TaskManager(), limit=args.limit, num_fewshot=0, log_samples=True,
                              bootstrap_iters=0)
scores, samples = {}, {}
for t in tasks:
    raw = out["results"][f"pause_{t}"]
    scores[t] = {k.split(",")[0]: v for k, v in raw.items() if "," in k and not k.split(",")[0].endswith("stderr")}
    samples[t] = [{"doc_id": s["doc_id"], "arguments": [list(a) for a in s["arguments"]],
                   "resps": [list(r[0]) if isinstance(r[0], tuple) else r[0] for r in s["resps"]]}
                  for s in out["samples"][f"pause_{t}"]]
print(json.dumps({"scores": scores, "samples": samples}))
