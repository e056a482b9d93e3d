"""Finetuning and evaluation see the same tokens: target split, truncation, decoding and answer filters.

In-process (no Megatron): lm-eval builds the requests of the nine tasks from the built-in sample rows, the
adapter (`PauseLM`) turns them into model inputs, and a recording plain-PyTorch module stands in for the network
where only its input matters.
"""

import json

import pytest
import torch

from conftest import SAMPLE_TASKS

M = 3  # pauses
DOCS = 8  # documents per task: every format is exercised on a few (the built-in eval files hold 32)


class Scores(torch.nn.Module):
    """An output layer whose logits rank the ids by `scores` at every position it is given ([seq, batch, h])."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, hidden, **kwargs):
        return self.scores.expand(hidden.shape[0], hidden.shape[1], -1).clone(), None


class Recorder(torch.nn.Module):
    """Records each input and returns logits that rank the ids by `scores` (default: all equal).

    Shaped like GPTModel where decoding relies on it: an `output_layer` on [seq, batch, hidden] states.
    """

    def __init__(self, vocab: int, scores=None):
        super().__init__()
        self.inputs: list[list[int]] = []
        self.output_layer = Scores(torch.zeros(vocab) if scores is None else scores)

    def forward(self, input_ids, position_ids, attention_mask, **kwargs):
        self.inputs.append(input_ids[0].tolist())
        logits, _ = self.output_layer(torch.zeros(input_ids.shape[1], input_ids.shape[0], 1))
        return logits.transpose(0, 1)


@pytest.fixture(scope="module")
def tok(tiny_c4):
    from pause_megatron.tokenizer import PauseTokenizer

    return PauseTokenizer.load(str(tiny_c4 / "tokenizer.model"))


def _lm(tok, model, **kwargs):
    from pause_megatron.evaluate import make_lm

    args = dict(m_inf=M, placement="append", max_length=4096, device=torch.device("cpu"))
    return make_lm(model, tok, **{**args, **kwargs})


def _lm_eval_task(name: str, data_dir=SAMPLE_TASKS):
    """lm-eval's own task object for one of ours, with its requests built."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from pause_megatron.tasks import get_task, lm_eval_config

    task = get_task_dict([lm_eval_config(get_task(name), data_dir=str(data_dir))], TaskManager())[f"pause_{name}"]
    task.build_all_requests(limit=DOCS, rank=0, world_size=1)
    return task


def _finetune_examples(tok, name: str) -> dict[str, list[tuple[list[int], list[int], str]]]:
    """prompt text -> [(prompt + pause ids, target ids without EOD, target text)] of FinetuneDataset on the rows."""
    from pause_megatron.data import FinetuneDataset
    from pause_megatron.tasks import get_task, load_examples

    pairs = load_examples(get_task(name), part="eval", data_dir=SAMPLE_TASKS)
    ds = FinetuneDataset(pairs, tokenizer=tok, seq_length=4096, m=M, placement="append", filler_id=None, seed=0,
                         where=name)
    out: dict = {}
    for (prompt, target), (ids, is_target) in zip(pairs, ds.examples):
        n = sum(is_target)
        assert ids[-1] == tok.eod_id and is_target[-n:] == [1] * n
        out.setdefault(prompt, []).append((ids[:-n], ids[-n:-1], target))
    return out


@pytest.mark.parametrize("name", ["gsm8k", "squad", "coqa", "commonsense_qa", "piqa", "hellaswag", "lambada",
                                  "webqs", "nq_open"])
def test_finetuning_targets_are_the_tokens_evaluation_scores(tok, name):
    from lm_eval.api.model import TemplateLM

    examples = _finetune_examples(tok, name)
    task = _lm_eval_task(name)
    model = Recorder(tok.vocab_size)
    lm = _lm(tok, model)
    checked = 0
    for inst in task.instances:
        context = inst.args[0]
        assert context in examples, f"{name}: lm-eval's prompt is not a finetuning prompt: {context!r}"
        if inst.request_type == "loglikelihood":
            if inst.idx != task.doc_to_target(inst.doc):
                continue
            continuation = inst.args[1]
            [(prompt_ids, target_ids, target)] = examples[context]
            assert target == continuation
            # lm-eval's own split, through its TemplateLM code with our tokenizer
            context_enc, continuation_enc = TemplateLM._encode_pair(lm, context, continuation)
            assert target_ids == continuation_enc
            assert prompt_ids == lm.with_pauses(context_enc)
            # and what the model is given when lm-eval asks the adapter for this likelihood
            model.inputs.clear()
            lm.loglikelihood([inst], disable_tqdm=True)
            assert model.inputs == [prompt_ids + target_ids]
        else:
            # generation: the finetuning prompt is what generate_until feeds the model, and the target is what
            # the model must then generate (lm-eval's split of context + target), which its metric scores full
            max_new = inst.args[1]["max_gen_toks"]
            prompt_ids, target_ids, target = examples[context][-1]  # CoQA: lm-eval asks the last turn
            assert target_ids == TemplateLM._encode_pair(lm, context, target)[1]
            assert prompt_ids == lm.prompt(lm.tok_encode(context), max_new)
            text = tok.decode(target_ids)
            for stop in inst.args[1]["until"]:
                text = text.split(stop)[0] if stop else text
            inst.resps = [text]
        checked += 1
    assert checked == min(DOCS, len(task.eval_docs))
    if task.instances[0].request_type == "generate_until":  # a perfect generation scores full marks
        task.apply_filters()
        metric = {"coqa": "f1"}.get(name, "exact_match")
        for inst in task.instances:
            for key, resp in inst.filtered_resps.items():
                assert task.process_results(inst.doc, [resp])[metric] == 1.0, (name, inst.resps, resp)


def test_prepended_pauses_survive_evaluation_truncation(tok):
    """A context too long for the window loses its beginning, not its pauses (finetuning's rule)."""
    from pause_megatron.pauses import finetune_example

    prompt = "Question: " + "the river runs past the mountains and the city " * 20 + "\nAnswer:"
    target = " the city"
    prompt_ids, target_ids = tok.encode_pair(prompt, target)
    max_length = 40
    assert len(prompt_ids) + M + len(target_ids) > max_length
    ft_ids, _ = finetune_example(prompt_ids, target_ids, m=M, pause_id=tok.pause_id, placement="prepend",
                                 max_length=max_length)
    assert ft_ids[:M] == [tok.pause_id] * M
    model = Recorder(tok.vocab_size)
    lm = _lm(tok, model, placement="prepend", max_length=max_length)
    lm._loglikelihood_tokens([((prompt, target), prompt_ids, target_ids)])
    assert model.inputs == [ft_ids]
    generation_prompt = lm.prompt(prompt_ids, 8)
    assert generation_prompt[:M] == [tok.pause_id] * M and len(generation_prompt) == max_length - 8


def test_greedy_decoding_emits_neither_padded_ids_nor_pauses(tok):
    from pause_megatron.decoding import continuation_logprob, greedy_generate

    padded = 128 * ((tok.vocab_size + 127) // 128) + 128
    scores = torch.arange(padded, dtype=torch.float32)  # the padded ids, then <pause> (the last piece), lead
    assert tok.pause_id == tok.vocab_size - 1
    lm = _lm(tok, Recorder(padded, scores))
    ids = greedy_generate(lm.model, tok.encode("Question: why?\nAnswer:"), max_new_tokens=4, use_cache=False,
                          **lm.decode_kwargs)
    assert ids == [tok.vocab_size - 2] * 4  # the best real piece
    tok.decode(ids)  # a padded id would raise "piece id is out of range"
    _, greedy = continuation_logprob(lm.model, [5, 6], [tok.vocab_size - 2], **lm.decode_kwargs)
    assert greedy


def test_a_batch_that_runs_out_of_memory_is_retried_smaller_with_the_same_results(capsys):
    """Batches above 3 items fail as CUDA's allocator does; results come back complete and in the callers' order."""
    from pause_megatron.decoding import run_batched

    sizes = []

    def scores(chunk):
        sizes.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    items = [5, 1, 9, 3, 7, 2, 8, 6, 4, 0, 11]
    assert run_batched(items, scores, "auto", sort_key=lambda x: -x) == [x * 10 for x in items]
    # auto starts at 64, but the first batch holds all 11: halved from 11, not from 64
    assert sizes == [11, 5, 2, 2, 2, 2, 2, 1]
    assert "a batch of 11 ran out of memory; batch size lowered to 5" in capsys.readouterr().err
    with pytest.raises(torch.OutOfMemoryError):  # one item that does not fit: the error, not a wrong score
        run_batched([1], lambda chunk: scores(chunk * 4), 1, sort_key=lambda x: x)


def test_one_item_that_runs_out_of_memory_is_split_and_still_scored_in_order(capsys):
    """Items of several requests (a context with its continuations): one that alone does not fit goes to `split`
    (evaluation: one row at a time); the others stay whole; results in the callers' order."""
    from pause_megatron.decoding import run_batched

    calls = []

    def scores(chunk):  # an item with more than 3 requests does not fit, even alone
        calls.append(len(chunk))
        if sum(len(item) for item in chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [[x * 10 for x in item] for item in chunk]

    items = [[1, 2], [3, 4, 5, 6, 7], [8]]
    split = []
    got = run_batched(items, scores, 4, sort_key=lambda item: -len(item),
                      split=lambda item: split.append(item) or [x * 10 for x in item])
    assert got == [[x * 10 for x in item] for item in items]
    assert split == [[3, 4, 5, 6, 7]]
    assert calls == [3, 1, 1, 1]  # all three, halved to one: the long one alone (then split), the others
    assert "one batch item ran out of memory; scoring it in pieces" in capsys.readouterr().err
    with pytest.raises(torch.OutOfMemoryError):  # the pieces do not fit either: the error
        run_batched([[1, 2, 3, 4]], scores, 1, sort_key=len, split=lambda item: scores([[x, x, x, x] for x in item]))


def test_lambada_answer_filter_keeps_apostrophes(tmp_path):
    """lm-eval's own filter and metric, with our pattern: apostrophes inside a word kept, quotes around it not."""
    folder = tmp_path / "lambada"
    folder.mkdir()
    rows = [{"text": "He said he would come but then he said he don't"},
            {"text": "She looked at the clock on the wall and it was five o'clock"},
            {"text": "They walked down the road toward the river"},
            {"text": "They walked down the road toward the lake"},
            {"text": "She said that she won’t"}]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _lm_eval_task("lambada", data_dir=tmp_path)
    outputs = [" don't.", "o'clock, she", '"river" they', " “lake” they", " won’t."]
    for inst, out in zip(task.instances, outputs):
        inst.resps = [out]
    task.apply_filters()
    scores = [task.process_results(inst.doc, [inst.filtered_resps["first-word"]])["exact_match"]
              for inst in task.instances]
    assert scores == [1.0] * 5


@pytest.mark.parametrize("placement", ["append", "prepend", "filler", "none"])
def test_fit_placed_cuts_the_prompt_and_keeps_the_pauses(placement):
    from pause_megatron.pauses import fit_placed, place_pauses

    prompt, pause, filler = list(range(10, 30)), 1, 2
    kw = dict(m=4, pause_id=pause, placement=placement, filler_id=filler)
    added = 0 if placement == "none" else 4
    assert fit_placed(prompt, max_length=50, **kw) == place_pauses(prompt, **kw)
    assert fit_placed(prompt, max_length=12, **kw) == place_pauses(prompt[-(12 - added):], **kw)
    assert fit_placed(prompt, max_length=added + 1, **kw) == place_pauses(prompt[-1:], **kw)
    with pytest.raises(ValueError, match="do not fit"):
        fit_placed(prompt, max_length=added, **kw)
