"""Decoding and scoring primitives of evaluation: greedy generation and continuation log-likelihoods, batched.

A batch holds sequences of different lengths without an attention mask, by the causal mask alone:
- scoring pads each row on the right; a real token never attends to a later position, so the padding changes
  no real position's output (only the shapes of the matmuls: float32 rounding, ~1e-6 relative);
- generation feeds every row the same positions (Megatron-Core's StaticInferenceContext has one
  sequence offset for the batch): the prefill runs to the shortest prompt, then one position per step, where
  a row still inside its prompt is given its next prompt token and a row past it its greedy pick (the
  static batching of Megatron-LM's text generation). No position of a row ever holds padding that a real
  token attends to, so each row decodes as it would alone.
- scoring continuations that share a context (the endings of a multiple-choice question) runs the
  positions every context of the batch holds before its last token once per context (a prefill with
  Megatron-Core's StaticInferenceContext), copies that KV cache to each continuation's row and runs the rest
  of every row in one forward reading it, causally (`score_shared`; the local spec's attention).
Rows are grouped by length (lm-eval's `Collator`, longest first) so that little is computed on padding, and
results come back in the callers' order. `run_batched` lowers a batch size that runs out of memory.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional, Sequence, Union

import torch

AUTO_BATCH_START = 64  # `batch_size="auto"` starts here and halves on running out of memory

BatchSize = Union[int, str]


def parse_batch_size(value: BatchSize) -> BatchSize:
    """An int >= 1 or "auto" (from the command line or a recipe); anything else is refused with the reason."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"batch size must be a positive integer or 'auto', got {value!r}")
    return n


def forward(model, ids: torch.Tensor, positions: torch.Tensor, context=None) -> torch.Tensor:
    """Logits [batch, seq, vocab] (float32) of a GPTModel without labels."""
    # runtime_gather_output: with tensor parallelism each rank holds a slice of the vocabulary; gather it
    return model(input_ids=ids, position_ids=positions, attention_mask=None, inference_context=context,
                 runtime_gather_output=True).float()


def greedy_pick(logits: torch.Tensor, *, vocab_size: Optional[int] = None, banned_ids: tuple[int, ...] = ()):
    """Argmax over the last dimension among the ids decoding may emit.

    Ids at and above `vocab_size` are the padded vocabulary (embedding rows that only make the table's size
    divisible; no piece decodes from them); `banned_ids` are ids with no meaning as output (`<pause>`).
    """
    if vocab_size is not None or banned_ids:
        logits = logits.clone()
        if vocab_size is not None:
            logits[..., vocab_size:] = float("-inf")
        logits[..., _checked_ids(banned_ids, logits.shape[-1])] = float("-inf")
    return logits.argmax(-1)


def _checked_ids(ids: Sequence[int], width: int) -> list[int]:
    """`ids` as a list, refused unless each is a row of the output layer (a negative id would ban from the end)."""
    wrong = [i for i in ids if not 0 <= i < width]
    if wrong:
        raise ValueError(f"banned ids {wrong} are not ids of the {width}-row output layer")
    return list(ids)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def run_batched(items: Sequence, fn: Callable[[list], list], batch_size: BatchSize, *,
                sort_key: Callable, split: Optional[Callable[[object], object]] = None) -> list:
    """fn over `items` in batches of `batch_size` ("auto": from AUTO_BATCH_START), results in `items`' order.

    Items are ordered by `sort_key` with lm-eval's `Collator` (callers sort longest first: a batch that does not
    fit fails on the first call). A batch that runs out of memory is retried at half its size (told on
    stderr), down to 1 item; one item that still does not fit is given to `split` (an item that is itself
    several requests, a context with its continuations, scored in smaller pieces), else the error is raised:
    results never depend on the size that ran them.
    """
    from lm_eval.models.utils import Collator

    if not items:
        return []
    size = AUTO_BATCH_START if batch_size == "auto" else int(batch_size)
    collator = Collator(list(items), sort_fn=sort_key)
    ordered = [x for chunk in collator.get_batched(n=len(items)) for x in chunk]
    results: list = []
    while len(results) < len(ordered):
        chunk = ordered[len(results): len(results) + size]
        try:
            results.extend(fn(chunk))
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            if len(chunk) == 1:
                if split is None:
                    raise
                print("evaluation: one batch item ran out of memory; scoring it in pieces", file=sys.stderr,
                      flush=True)
                results.append(split(chunk[0]))
                continue
            size = len(chunk) // 2  # halved from what ran (the chunk may be smaller than `size`), at least 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"evaluation: a batch of {len(chunk)} ran out of memory; batch size lowered to {size}",
                  file=sys.stderr, flush=True)
    return collator.get_original(results)


def _gpt(model):
    """The GPTModel behind its wrappers (Float16Module, DDP: `.module`)."""
    m = model
    while not hasattr(m, "output_layer") and hasattr(m, "module"):
        m = m.module
    return m


def _output_layer(model):
    """The output layer of a GPTModel behind its wrappers."""
    m = _gpt(model)
    if getattr(m, "output_layer", None) is None:
        raise ValueError("scoring needs the model's output layer (the last pipeline stage of a GPTModel)")
    return m.output_layer


@contextlib.contextmanager
def logits_only_at(model, rows: torch.Tensor, positions: torch.Tensor):
    """While inside, the model computes logits only at (row, position) pairs: forward returns [1, K, vocab].

    A forward pre-hook on the output layer keeps only those K hidden states (its input is [seq, batch,
    hidden]), so the full-vocabulary matmul and GPTModel's logits transpose run on K positions instead of
    batch x seq (scoring needs the continuation's positions only). The output layer is column-parallel: every
    tensor-parallel rank holds the same hidden states and selects the same ones, and the logits are gathered
    as before. With sequence parallelism the input is split along the sequence, so selecting is refused.
    """
    layer = _output_layer(model)
    if getattr(layer, "sequence_parallel", False):
        raise ValueError("logits_only_at: the output layer's input is split by sequence parallelism")

    def keep(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input_")
        picked = hidden[positions.to(hidden.device), rows.to(hidden.device)].unsqueeze(1)  # [K, 1, hidden]
        return (picked,) + tuple(args[1:]), kwargs

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def score_batch(model, rows: Sequence[tuple[list[int], list[int]]], *, vocab_size: Optional[int] = None,
                banned_ids: tuple[int, ...] = (), device: torch.device = torch.device("cpu"),
                pad_id: int = 0) -> list[tuple[float, bool]]:
    """[(sum of log p(continuation | context), whether greedy decoding would produce it)] in one forward.

    Rows are padded on the right (with `pad_id`: never attended to by a real token). Logits are computed only
    at the positions that predict a continuation token (`logits_only_at`). The log-probabilities are the
    model's own (over its whole output layer); "greedy" picks as `generate` does.
    """
    from pause_megatron import cpu_emulation

    width = max(len(c) + len(x) for c, x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, (c, x) in enumerate(rows):
        ids[b, : len(c) + len(x)] = torch.tensor(c + x, dtype=torch.long)
    ids = ids.to(device)
    positions = torch.arange(width, device=device).unsqueeze(0).expand(len(rows), -1)
    at_row = torch.cat([torch.full((len(x),), b, dtype=torch.long) for b, (_, x) in enumerate(rows)])
    at_pos = torch.cat([torch.arange(len(c) - 1, len(c) - 1 + len(x)) for c, x in rows])
    with cpu_emulation.without_device_rewrites(), logits_only_at(model, at_row, at_pos):
        logits = forward(model, ids, positions)[0]  # [K, vocab], the rows' continuations one after another
    return score_rows(logits, [x for _, x in rows], vocab_size=vocab_size, banned_ids=banned_ids)


# Logits scored per step. On a CPU 4 MiB of float32, so a step's passes run in cache; on a GPU as many as
# fit 256 MiB of float32, so a batch's scoring is a few kernels rather than a few per 32 rows.
SCORE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "accelerator": 1 << 26}


def score_block_rows(width: int, device: torch.device) -> int:
    """Rows of logits `score_rows` works on at a time (`SCORE_CHUNK_ELEMENTS` of this device kind)."""
    return max(1, SCORE_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"] // max(1, width))


def score_rows(logits: torch.Tensor, continuations: Sequence[list[int]], *, vocab_size: Optional[int] = None,
               banned_ids: tuple[int, ...] = ()) -> list[tuple[float, bool]]:
    """[(sum of log p(continuation), whether greedy picks it)] from `logits` [K, vocab], the positions that
    predict the continuations' tokens one after another (K = their total length). Consumes `logits`.

    log p(t) = x_t - m - log(sum(exp(x - m))) over the whole output layer (m its maximum), as `log_softmax`
    computes it. "Greedy" is `greedy_pick`'s choice on the logits (as `generate` picks): t is picked when it
    may be emitted and x_t is the largest logit among the ids that may be, and the only one that large; a tie
    (bf16 logits have them) is settled by `greedy_pick` itself (the first such id) on the tied positions alone.
    (Before, `greedy_pick` ran on the log-probabilities, where two logits an ulp apart can round into a tie.)
    The logits are worked on in place, in blocks of rows (`score_block_rows`), with a maximum and an exp-sum
    pass each, and one more maximum where the target is the largest (the tie check): no log-softmax tensor of
    the logits' size is written and no argmax is taken (on a CPU, `argmax` costs about ten times `amax`).
    A NaN logit makes the position's log-probability NaN and its flag False (`argmax` would pick the NaN).
    Scoring alone is 2.2-3.0x faster on logits of the tiny model's width (docs/performance.md).
    """
    lengths = [len(x) for x in continuations]
    if sum(lengths) != logits.shape[0]:
        raise ValueError(f"score_rows: {logits.shape[0]} positions of logits for {sum(lengths)} continuation tokens")
    device, width = logits.device, logits.shape[-1]
    target = torch.tensor([t for x in continuations for t in x], dtype=torch.long, device=device)
    limit = width if vocab_size is None else min(vocab_size, width)
    banned = torch.tensor(sorted({i for i in _checked_ids(banned_ids, width) if i < limit}), dtype=torch.long,
                          device=device)
    allowed = (target < limit) & ~torch.isin(target, banned)
    logprob = torch.empty(target.shape, dtype=torch.float32, device=device)
    hit = torch.empty(target.shape, dtype=torch.bool, device=device)
    step = score_block_rows(width, device)
    for s in range(0, logits.shape[0], step):
        block, t = logits[s: s + step].float(), target[s: s + step]
        chosen = block.gather(1, t[:, None])[:, 0]
        if len(banned) or limit < width:  # the largest logit among the ids that may be emitted, then of all
            kept = block[:, banned].clone()
            block[:, banned] = float("-inf")
            allowed_top = block[:, :limit].amax(-1)
            top = allowed_top
            for rest in (kept, block[:, limit:]):
                if rest.shape[-1]:
                    top = torch.maximum(top, rest.amax(-1))
        else:
            allowed_top = top = block.amax(-1)
        candidate = allowed[s: s + step] & (chosen == allowed_top)
        rows = candidate.nonzero()[:, 0]
        if len(rows):  # x_t is the largest: greedy picks t unless another id is as large (then the first wins)
            block[rows, t[rows]] = float("-inf")
            runner_up = block[:, :limit].amax(-1)[rows]  # one more amax pass, no copy of the rows
            block[rows, t[rows]] = chosen[rows]
            tied = rows[runner_up == allowed_top[rows]]
            if len(tied):
                candidate[tied] = greedy_pick(block[tied], vocab_size=vocab_size, banned_ids=banned_ids) == t[tied]
        if len(banned) or limit < width:
            block[:, banned] = kept
        hit[s: s + step] = candidate
        logprob[s: s + step] = (chosen - top) - block.sub_(top[:, None]).exp_().sum(-1).log_()
    if not lengths:
        return []
    sums = torch.stack([p.sum() for p in logprob.split(lengths)]).tolist()  # one copy to the host, not one a row
    hits = torch.stack([h.all() for h in hit.split(lengths)]).tolist()
    return list(zip(sums, hits))


def shares_contexts(model) -> bool:
    """Whether `score_shared` can run on this model: its attention stays causal over a KV cache.

    After a prefill, Megatron-Core's static inference context passes the `no_mask` type (it expects one new
    position per step); the rows of `score_shared` are several positions each. `attention.SDPAttention` (the
    local spec's core attention) keeps a causal layer causal, aligned to the cache's end; Transformer Engine's
    attention would attend to every position of the rows (later ones too), so with the TE spec scoring keeps
    one row per request.
    """
    from pause_megatron.attention import SDPAttention

    cores = [m.core_attention for m in _gpt(model).modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(type(c) is SDPAttention for c in cores)


@torch.no_grad()
def score_shared(model, groups: Sequence[tuple[list[int], list[list[int]]]], *, vocab_size: Optional[int] = None,
                 banned_ids: tuple[int, ...] = (), device: torch.device = torch.device("cpu"),
                 pad_id: int = 0) -> list[list[tuple[float, bool]]]:
    """`score_batch` of (context, its continuations) groups, each context's shared positions computed once.

    The first `shared` positions (every context of the batch is longer: the shortest context less its last
    token) run once per context into a StaticInferenceContext; its keys and values are copied to one row per
    continuation (`index_select` on the cache's batch dimension), and each row's remaining context and its
    continuation run in one forward at positions shared.. reading that cache, causally (`shares_contexts`;
    padded on the right: a real token never attends to padding). Every row sees exactly the keys and rotary
    positions (by cache slot) it sees alone; only the matmuls' shapes differ (float32 rounding).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from pause_megatron import cpu_emulation
    from pause_megatron.compat import inference_mode, logits_at_every_position

    rows = [(g, c, x) for g, (c, xs) in enumerate(groups) for x in xs]
    shared = min(len(c) for c, _ in groups) - 1
    if shared < 1:  # a one-token context: nothing to share
        flat = score_batch(model, [(c, x) for _, c, x in rows], vocab_size=vocab_size, banned_ids=banned_ids,
                           device=device, pad_id=pad_id)
    else:
        width = max(len(c) + len(x) for _, c, x in rows)
        context = StaticInferenceContext(len(groups), width)
        with inference_mode(), cpu_emulation.without_device_rewrites():
            ids = torch.tensor([c[:shared] for c, _ in groups], device=device)
            forward(model, ids, torch.arange(shared, device=device).unsqueeze(0).expand(len(groups), -1), context)
            index = torch.tensor([g for g, _, _ in rows], device=device)
            for layer, (keys, values) in list(context.key_value_memory_dict.items()):  # [seq, batch, heads, dim]
                context.key_value_memory_dict[layer] = (keys.index_select(1, index), values.index_select(1, index))
            context.max_batch_size = len(rows)
            context.sequence_len_offset = shared
            logits_at_every_position(context)  # the continuations' positions, not the rows' last one
            ids = torch.full((len(rows), width - shared), pad_id, dtype=torch.long)
            for r, (_, c, x) in enumerate(rows):
                ids[r, : len(c) + len(x) - shared] = torch.tensor((c + x)[shared:], dtype=torch.long)
            positions = torch.arange(shared, width, device=device).unsqueeze(0).expand(len(rows), -1)
            at_row = torch.cat([torch.full((len(x),), r, dtype=torch.long) for r, (_, _, x) in enumerate(rows)])
            at_pos = torch.cat([torch.arange(len(c) - 1 - shared, len(c) - 1 - shared + len(x)) for _, c, x in rows])
            with logits_only_at(model, at_row, at_pos):
                logits = forward(model, ids.to(device), positions, context)[0]
        flat = score_rows(logits, [x for _, _, x in rows], vocab_size=vocab_size, banned_ids=banned_ids)
    out: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for (g, _, _), result in zip(rows, flat):
        out[g].append(result)
    return out


def continuation_logprob(model, context: list[int], continuation: list[int], **kwargs) -> tuple[float, bool]:
    """`score_batch` of one row."""
    return score_batch(model, [(context, continuation)], **kwargs)[0]


@torch.inference_mode()  # not no_grad: skips autograd's version counters and view tracking, ~10% per cached step
def generate(model, prompts: Sequence[list[int]], *, max_new_tokens: Union[int, Sequence[int]],
             stop_ids: tuple[int, ...] = (), stop: Optional[Callable[[int, list[int]], bool]] = None,
             vocab_size: Optional[int] = None, banned_ids: tuple[int, ...] = (), use_cache: bool = True,
             device: torch.device = torch.device("cpu")) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (of any lengths), each ending on its own.

    Row b stops at a stop id (not returned), after `max_new_tokens[b]` tokens, or when `stop(b, its tokens so
    far)` is true (the caller's stop strings, checked on the decoded text as it grows); the batch ends when
    every row has stopped. Only ids below `vocab_size` and not in `banned_ids` are picked (`greedy_pick`).
    With `use_cache`, each position runs once and later ones reuse its keys and values (Megatron-Core's
    StaticInferenceContext); without it, every step recomputes the whole sequence (the reference).
    """
    from pause_megatron import cpu_emulation
    from pause_megatron.compat import inference_mode

    n = len(prompts)
    max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ValueError("generation needs at least one prompt token per row")
    total = max(length + m for length, m in zip(lengths, max_new))
    tokens = torch.zeros((n, total), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    out: list[list[int]] = [[] for _ in range(n)]
    done = [m <= 0 for m in max_new]
    context = None
    if use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(n, total)
    prev, cur = 0, min(lengths)
    with inference_mode() if use_cache else contextlib.nullcontext(), cpu_emulation.without_device_rewrites():
        while not all(done):
            start = prev if use_cache else 0
            positions = torch.arange(start, cur, device=device).unsqueeze(0).expand(n, -1)
            logits = forward(model, tokens[:, start:cur], positions, context)
            picked = greedy_pick(logits[:, -1], vocab_size=vocab_size, banned_ids=banned_ids).tolist()
            if use_cache:
                context.sequence_len_offset += cur - prev
            for b in range(n):
                if done[b] or cur < lengths[b]:  # stopped, or still reading its prompt
                    continue
                if picked[b] in stop_ids:
                    done[b] = True
                    continue
                tokens[b, cur] = picked[b]
                out[b].append(picked[b])
                done[b] = len(out[b]) >= max_new[b] or (stop is not None and stop(b, out[b]))
            prev, cur = cur, cur + 1
    return out


def greedy_generate(model, prompt: list[int], *, max_new_tokens: int, **kwargs) -> list[int]:
    """`generate` of one prompt, stopping only at stop ids or after `max_new_tokens`."""
    return generate(model, [prompt], max_new_tokens=max_new_tokens, **kwargs)[0]
