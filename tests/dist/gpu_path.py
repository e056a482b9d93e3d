"""Train, checkpoint, resume and decode in bf16 (Float16Module), optionally with a GPU's kernel decisions.

--simulate-gpu builds the model with the flags pause_megatron.kernels chooses for CUDA when apex, Transformer
Engine and Megatron's compiled kernels are absent (a plain `pip install` on a GPU), under the CPU emulation.
Writes JSON: the decisions, losses of 4 uninterrupted steps and of 2 + save + load + 2, and decoding results.
--eval-checkpoint also loads a bf16 checkpoint of the real CLI through the evaluation entry point
(evaluate.load_for_inference) and decodes with and without the KV cache.
"""

import argparse
import json
import os

import torch

from pause_megatron import checkpoint, kernels, runtime
from pause_megatron.config import load_config
from pause_megatron.data import collate, windows_to_samples
from pause_megatron.decoding import continuation_logprob, greedy_generate
from pause_megatron.evaluate import load_for_inference
from pause_megatron.model import build_gpt, prepare_chunks
from pause_megatron.tokenizer import padded_vocab_size
from pause_megatron.train import build_train_state, train_step

from train_layout import PAUSE_ID, VOCAB, synthetic_batch


def batches(cfg, step):
    samples = windows_to_samples(synthetic_batch(step, global_batch=cfg.train.global_batch_size,
                                                 seq_length=cfg.model.seq_length, seed=cfg.train.seed))
    m = cfg.train.micro_batch_size
    return [collate(samples[i:i + m], pause_id=PAUSE_ID) for i in range(0, len(samples), m)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--simulate-gpu", action="store_true")
    ap.add_argument("--eval-checkpoint", default=None)
    args = ap.parse_args()
    cfg = load_config(None, ["model.preset=tiny", "precision.dtype=bf16", "train.steps=4", "optim.warmup_steps=1",
                             "optim.lr=1e-3", "train.global_batch_size=4", "train.micro_batch_size=2",
                             "model.hidden_dropout=0.1", "model.attention_dropout=0.1"], world_size=1)
    runtime.init_distributed(cfg)
    k = kernels.choose(kernels.Present(cuda=True, apex=False, transformer_engine=False,
                                       grad_accum_kernel=False)) if args.simulate_gpu else None
    vocab = padded_vocab_size(VOCAB)
    out = {"kernels": None if k is None else k.transformer_config_kwargs()}

    def fresh():
        runtime.seed_everything(cfg.train.seed)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(cfg.train.seed)
        return build_train_state(cfg, vocab_size=vocab, cuda=False, kernels=k)

    state = fresh()
    out["wrapper"] = type(state.model[0].module).__name__
    out["param_dtypes"] = sorted({str(p.dtype) for p in state.model[0].parameters()})
    out["main_param_dtypes"] = sorted({str(p.dtype) for g in state.optimizer.param_groups for p in g["params"]})
    out["straight"] = [train_step(state, batches(cfg, s))["loss"] for s in range(4)]

    state = fresh()
    resumed = [train_step(state, batches(cfg, s))["loss"] for s in range(2)]
    checkpoint.save(state, args.ckpt)
    state = fresh()
    checkpoint.load(state, args.ckpt)
    resumed += [train_step(state, batches(cfg, s))["loss"] for s in range(state.step, 4)]
    out["resumed"] = resumed

    model = prepare_chunks([build_gpt(cfg, vocab_size=vocab, cuda=False, kernels=k)], cuda=False)[0]
    checkpoint.load_model([model], args.ckpt)
    model.eval()
    prompt = list(range(5, 25))
    out["cached"] = greedy_generate(model, prompt, max_new_tokens=8, use_cache=True)
    out["recomputed"] = greedy_generate(model, prompt, max_new_tokens=8, use_cache=False)
    out["logprob"] = continuation_logprob(model, prompt, [7, 8, 9])[0]
    runtime.destroy()
    if args.eval_checkpoint:
        model, ecfg, tokenizer = load_for_inference(args.eval_checkpoint)
        prompt = tokenizer.encode("the pause token model learns")
        out["eval"] = {"dtype": ecfg.precision.dtype, "wrapper": type(model).__name__,
                       "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                       "cached": greedy_generate(model, prompt, max_new_tokens=8, use_cache=True),
                       "recomputed": greedy_generate(model, prompt, max_new_tokens=8, use_cache=False)}
    with open(args.out, "w") as f:
        json.dump(out, f)
    runtime.destroy()


if __name__ == "__main__":
    main()
