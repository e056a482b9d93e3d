"""`score_shared` against `score_batch` one row at a time, on a tiny random model (one process).

`score_shared_rows.py` prints `SHARED {json}`: per position embedding (RoPE, learned absolute), per case, the
largest relative difference of a log-likelihood and whether every greedy flag agrees (or the error it raised). The cases are the
shapes where the shared prefix and the rows' own positions can go wrong: contexts of different lengths (one
a prefix of another), continuations of different lengths, equal contexts with one-token continuations (each
row's only logits at its first own position), a context of two tokens (one shared position), an empty
continuation. With learned absolute positions `position_ids` decide a token's position (RoPE takes a cached
token's position from `sequence_len_offset`), so only that arm sees rows given the wrong positions.
The weights are scaled up from the initialisation so that a token at the wrong position changes its logits
by far more than float32 rounding. Also: how many positions reach the output layer in the prefill (its
logits are never read; only the last should be computed, not the full vocabulary at every shared position).
"""

import json
import random

import torch

from pause_megatron import runtime
from pause_megatron.config import load_config
from pause_megatron.decoding import score_batch, score_shared, shares_contexts
from pause_megatron.model import build_gpt
from pause_megatron.tokenizer import padded_vocab_size

VOCAB = 100


def cases(rng):
    tok = lambda n: [rng.randrange(VOCAB) for _ in range(n)]  # noqa: E731
    c = tok(20)
    return {
        "contexts of different lengths, one a prefix of another": [(c[:8], [tok(3), tok(7)]), (c, [tok(1), tok(5)])],
        "continuations of different lengths": [(tok(10), [tok(1), tok(30), tok(2)]), (tok(14), [tok(4)])],
        "equal contexts, one-token continuations": [(tok(9), [tok(1), tok(1), tok(1)]), (tok(9), [tok(1), tok(1)])],
        "a two-token context (one shared position)": [(tok(2), [tok(4), tok(1)]), (tok(30), [tok(3)])],
        "an empty continuation": [(tok(9), [[], tok(2)]), (tok(5), [tok(3)])],
    }


def main() -> None:
    out = {}
    for embedding in ("rope", "learned_absolute"):
        cfg = load_config(None, ["model.preset=tiny", "model.seq_length=64",
                                 f"model.position_embedding={embedding}"])
        runtime.init_distributed(cfg)
        torch.manual_seed(0)
        model = build_gpt(cfg, vocab_size=padded_vocab_size(VOCAB), cuda=False).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() > 1:
                    p.add_(torch.randn(p.shape) * 3 * float(p.std()))
        assert shares_contexts(model)
        seen = []  # the output layer's input [seq, batch, hidden] at each forward: the prefill's must be its last
        model.output_layer.register_forward_pre_hook(lambda module, args: seen.append(list(args[0].shape[:2])))
        results = {}
        for name, groups in cases(random.Random(1)).items():
            try:  # each case on its own: one that crashes does not hide another that scores wrong silently
                shared = score_shared(model, groups)
            except Exception as exc:  # noqa: BLE001 (reported, and the test fails on it)
                results[name] = {"error": repr(exc)[:300]}
                continue
            worst, flags = 0.0, True
            for (c, xs), got in zip(groups, shared):
                assert len(got) == len(xs)
                for x, (ll, greedy) in zip(xs, got):
                    ref_ll, ref_greedy = score_batch(model, [(c, x)])[0]
                    worst = max(worst, abs(ll - ref_ll) / max(1e-9, abs(ref_ll)))
                    flags &= greedy == ref_greedy
            results[name] = {"max_rel": worst, "flags_equal": flags}
        seen.clear()
        score_shared(model, [([1, 2, 3, 4, 5, 6], [[7, 8], [9]]), ([1, 2, 3, 4, 5, 6, 7, 8], [[9]])])
        out[f"{embedding} prefill positions"] = seen[0][0]  # before logits_only_at (registered after this hook)
        out[embedding] = results
    print("SHARED " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
