"""One training step on Megatron-Core, shared by pretraining and finetuning.

A batch is a list of microbatches, each a dict of [micro_batch, seq] tensors: `tokens`, `labels`,
`loss_mask` (from the pause rule: 0 where the target is `<pause>` or padding) and `position_ids`. The loss
is summed over unmasked targets and divided by their count across all microbatches and data-parallel
ranks (Megatron's per-token loss normalisation), so a microbatch full of pauses weighs what it should.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from pause_megatron import stop_signals
from pause_megatron.config import Config
from pause_megatron.model import build_model_chunks, prepare_chunks
from pause_megatron.perf import memory_gb, model_flops, peak_tflops  # MFU convention: see perf.py


@dataclass
class TrainState:
    """Everything a step needs; `step` counts optimizer steps taken."""

    cfg: Config
    model: list  # Megatron DDP-wrapped chunks (one, or virtual_pipeline of them)
    optimizer: object
    scheduler: object
    cuda: bool
    step: int = 0
    consumed_samples: int = 0

    @property
    def tconfig(self):
        return self.model[0].config


def build_train_state(cfg: Config, *, vocab_size: int, cuda: bool, kernels=None) -> TrainState:
    """Model chunks (Float16Module in bf16) in Megatron DDP, the Megatron optimizer (Adam, fp32 main params
    in bf16) and the LR/WD scheduler. `kernels` overrides this machine's decisions (see model.build_gpt)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = prepare_chunks(build_model_chunks(cfg, vocab_size=vocab_size, cuda=cuda, kernels=kernels), cuda=cuda)
    tconfig = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optim.distributed,
        check_for_nan_in_grad=True,
    )
    model = [
        DistributedDataParallel(
            config=tconfig,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffers are bucketed separately for overlap; no overlap here.
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    o = cfg.optim
    bf16 = tconfig.bf16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=tconfig.params_dtype,
            use_distributed_optimizer=o.distributed,
        ),
        model,
    )
    # The schedules call these between microbatches and at the end of the backward pass.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    total = cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=total,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
    return TrainState(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, cuda=cuda)


def _loss_func(loss_mask: torch.Tensor, all_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed loss over unmasked targets and their count; the schedule normalises by the total count.

    Also reports the loss over every target, pauses included ("all-token loss"), for validation.
    """
    losses = output_tensor.float().view(-1)
    loss_mask = loss_mask.view(-1).float()
    all_mask = all_mask.view(-1).float()
    loss_sum = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().to(torch.int)
    report = {
        "lm loss": torch.stack([loss_sum.detach(), num_tokens.float()]),
        "all-token loss": torch.stack([torch.sum(losses.detach() * all_mask), all_mask.sum()]),
    }
    return loss_sum, num_tokens, report


def _forward_step(data_iterator: Iterator[dict], model, *, device: torch.device):
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,  # causal mask from the layer spec
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"], batch.get("all_mask", batch["loss_mask"]))


def _run_schedule(state: TrainState, microbatches: list[dict], *, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_length = microbatches[0]["tokens"].shape[1]
    micro_batch_size = microbatches[0]["tokens"].shape[0]
    device = torch.device("cuda", torch.cuda.current_device()) if state.cuda else torch.device("cpu")
    if len(state.model) > 1:  # interleaved: one iterator per model chunk, each over the same microbatches
        data_iterator = [iter(microbatches) for _ in state.model]
    else:
        data_iterator = iter(microbatches)
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=partial(_forward_step, device=device),
        data_iterator=data_iterator,
        model=state.model if len(state.model) > 1 else state.model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _mean_loss(losses: list[dict], *, cuda: bool, key: str = "lm loss") -> tuple[float, int]:
    """(loss per unmasked token, token count) over microbatches and data-parallel ranks.

    Only the last pipeline stage computes losses; the result is broadcast so every rank returns it.
    """
    from megatron.core import parallel_state

    total = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += item[key].detach().to("cpu", torch.float64)
    if torch.distributed.is_initialized():
        # Sum over data-parallel ranks, then share the last stage's value along the pipeline.
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        t = total.to(dev)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        torch.distributed.all_reduce(t, group=parallel_state.get_pipeline_model_parallel_group())
        total = t.cpu()
    loss_sum, count = float(total[0]), int(total[1])
    return (loss_sum / max(count, 1)), count


def train_step(state: TrainState, microbatches: list[dict]) -> dict:
    """One optimizer step over this data-parallel rank's microbatches; returns loss, tokens, grad norm, lr."""
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    losses = _run_schedule(state, microbatches, forward_only=False)
    update_successful, grad_norm, _ = state.optimizer.step()
    if update_successful:
        state.scheduler.step(increment=1)
    state.step += 1
    loss, count = _mean_loss(losses, cuda=state.cuda)
    lr = state.optimizer.param_groups[0]["lr"]
    positions, width_sum = _computed_positions(microbatches, cuda=state.cuda)
    return {"loss": loss, "tokens": count, "grad_norm": float(grad_norm or 0.0), "lr": lr,
            "skipped": not update_successful, "positions": positions, "width_sum": width_sum}


def _computed_positions(microbatches: list[dict], *, cuda: bool) -> tuple[int, int]:
    """(token positions the step computed, the sum over them of their sequence's width), over data-parallel ranks.

    Finetuning pads each microbatch to its longest example, so the step's work is these widths, not
    global_batch x seq_length; every pipeline stage and tensor rank holds the same microbatches.
    """
    from megatron.core import parallel_state

    shapes = [mb["tokens"].shape for mb in microbatches]
    t = torch.tensor([sum(b * s for b, s in shapes), sum(b * s * s for b, s in shapes)], dtype=torch.float64)
    if torch.distributed.is_initialized():
        dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        t = t.to(dev)
        torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
        t = t.cpu()
    return int(t[0]), int(t[1])


@torch.no_grad()
def eval_step(state: TrainState, microbatches: list[dict]) -> dict:
    """Validation losses without updating anything: on non-pause targets (`loss`) and on all targets."""
    for chunk in state.model:
        chunk.eval()
    try:
        losses = _run_schedule(state, microbatches, forward_only=True)
    finally:
        for chunk in state.model:
            chunk.train()
    loss, count = _mean_loss(losses, cuda=state.cuda)
    all_loss, all_count = _mean_loss(losses, cuda=state.cuda, key="all-token loss")
    return {"loss": loss, "tokens": count, "all_token_loss": all_loss, "all_tokens": all_count}


# ----------------------------------------------------------------------------------------------------------
# The loop: the same for pretraining and finetuning; only where the batches come from differs.

class GracefulStop:
    """SIGTERM / SIGUSR1 (what Slurm sends before a time limit or a preemption) ask for save-and-exit.

    Every rank must agree to stop at the same step, so the flag is all-reduced (MAX) after each step.
    """

    SIGNALS = stop_signals.NAMES

    def __init__(self, *, cuda: bool):
        import signal

        self.cuda = cuda  # NCCL reduces CUDA tensors only
        self.requested = False
        self.signal_name: Optional[str] = None
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._handler)
        # A signal caught during start-up (stop_signals.catch) counts: the loop saves after its first step. Read
        # after the handlers are ours: one that came in between is then either in `received` or handled here.
        if stop_signals.received:
            self.requested = True
            self.signal_name = stop_signals.received[0]

    def _handler(self, signum, frame):
        import signal

        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if torch.distributed.is_initialized():
            if self.cuda:
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)


def validate(state: TrainState, valid_batches: Callable[[int], list[dict]]) -> dict:
    """Mean validation losses over `eval_steps` global batches (the same batches every time)."""
    sums = {"loss": 0.0, "tokens": 0, "all_token_loss": 0.0, "all_tokens": 0}
    g = state.cfg.train.global_batch_size
    for i in range(state.cfg.train.eval_steps):
        r = eval_step(state, valid_batches(i * g))
        sums["loss"] += r["loss"] * r["tokens"]
        sums["tokens"] += r["tokens"]
        sums["all_token_loss"] += r["all_token_loss"] * r["all_tokens"]
        sums["all_tokens"] += r["all_tokens"]
    return {
        "val/loss": sums["loss"] / max(sums["tokens"], 1),  # on non-pause targets
        "val/all_token_loss": sums["all_token_loss"] / max(sums["all_tokens"], 1),  # pauses included
    }


def fit(
    state: TrainState,
    *,
    train_batches: Callable[[int], list[dict]],
    valid_batches: Optional[Callable[[int], list[dict]]],
    tracker,
    vocab_size: int,
    checkpoint_extra: dict,
) -> dict:
    """Train from `state.step` to `train.steps`: log, validate, checkpoint; save and return on SIGTERM/SIGUSR1.

    `train_batches(start)` returns this rank's microbatches of the global batch at sample `start`.
    Returns {"stopped": bool, "step": int, "last": metrics of the last step}.
    """
    import json
    import os
    import time

    from pause_megatron import checkpoint, progress

    cfg = state.cfg
    t = cfg.train
    rank0 = torch.distributed.get_rank() == 0
    world = torch.distributed.get_world_size()
    ckpt_root = os.path.join(t.output_dir, "checkpoints")
    peak = peak_tflops(cuda=state.cuda)
    stop = GracefulStop(cuda=state.cuda)
    metrics_file = open(os.path.join(t.output_dir, "metrics.jsonl"), "a") if rank0 else None
    bar = progress.bar(total=t.steps, initial=state.step, disable=not rank0, unit="step")
    last: dict = {}
    # Resumed at a step that `latest` already holds (a finished run started again): nothing to save.
    saved_at = state.step if checkpoint.latest_checkpoint(ckpt_root) == checkpoint.iteration_dir(
        ckpt_root, state.step) else -1
    stopped = False
    try:
        while state.step < t.steps:
            start = time.perf_counter()
            out = train_step(state, train_batches(state.consumed_samples))
            state.consumed_samples += t.global_batch_size
            elapsed = time.perf_counter() - start
            flops = model_flops(cfg, vocab_size=vocab_size, positions=out["positions"], width_sum=out["width_sum"])
            tflops = flops / elapsed / world / 1e12
            last = {
                "train/loss": out["loss"],
                "train/lr": out["lr"],
                "train/grad_norm": out["grad_norm"],
                "train/loss_tokens": out["tokens"],
                "perf/positions": out["positions"],  # computed, padding included (finetuning: padded widths)
                "perf/tokens_per_s": out["positions"] / elapsed,
                "perf/target_tokens_per_s": out["tokens"] / elapsed,  # the loss's tokens (no pads, no pauses)
                "perf/tflops_per_gpu": tflops,
                "perf/mfu": (tflops / peak) if peak else None,
                "perf/memory_gb": memory_gb(state.cuda),
            }
            if valid_batches is not None and t.eval_interval and (state.step % t.eval_interval == 0
                                                                   or state.step == t.steps):
                last.update(validate(state, valid_batches))
            if rank0:
                metrics_file.write(json.dumps({"step": state.step, **last}) + "\n")
                metrics_file.flush()
                if state.step % max(t.log_interval, 1) == 0 or state.step == t.steps:
                    tracker.log_metrics({k: v for k, v in last.items() if v is not None}, step=state.step)
                bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{last['perf/tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
            stopped = stop.agreed()
            if stopped or (t.save_interval and state.step % t.save_interval == 0):
                checkpoint.save(state, ckpt_root, extra=checkpoint_extra, keep=t.keep_checkpoints)
                saved_at = state.step
            if stopped:
                if rank0:
                    print(f"\nstopped by {stop.signal_name or 'a signal on another rank'} at step {state.step}; "
                          f"checkpoint saved in {ckpt_root}", flush=True)
                break
        if not stopped and saved_at != state.step:
            checkpoint.save(state, ckpt_root, extra=checkpoint_extra, keep=t.keep_checkpoints)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"stopped": stopped, "step": state.step, "last": last}
