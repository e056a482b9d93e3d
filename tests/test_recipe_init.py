"""Recipes that continue pretraining an imported Hugging Face model (init.hf_dir): the plan, and a tiny one run
end to end (import -> data with the imported tokenizer -> StdPT and PausePT from the imported weights -> finetune,
evaluate, report)."""

import json

import pytest

from helpers import python

NEW = ("continue_pretrain_smollm2_pause", "continue_pretrain_llama32_1b_pause")
FEW = ("finetune.tasks=[squad,gsm8k]", "finetune.seeds=[4]")  # the plan's shape at a 30th of its 545 stages


def plan_of(path, *overrides):
    from pause_megatron.recipe import full_plan, load_recipe

    recipe = load_recipe(path, list(overrides))
    return recipe, {s.key: s for s in full_plan(recipe)}


@pytest.mark.parametrize("name", NEW)
def test_continue_pretrain_recipes_plan_the_import_first_and_print_gpu_hours(name):
    from pause_megatron.recipe import print_plan

    recipe, stages = plan_of(f"recipes/{name}.yaml", *FEW)
    root = f"{recipe.output_dir}/import/checkpoints"
    assert list(stages)[:2] == ["import", "data"] and stages["data"].deps == ["import"]
    for variant in ("std", "pause"):
        pt = stages[f"pretrain/{variant}"]
        assert set(pt.deps) == {"data", "import"} and f"train.init_from={root}" in pt.argv
        assert "model.seq_length=2048" in pt.argv
    for v in ("StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT"):
        assert any(s.tags.get("variant") == v and s.kind == "evaluate" for s in stages.values()), v
    lines = []
    print_plan(recipe, log=lines.append)
    out = "\n".join(lines)
    # planned before the model and C4 are downloaded: it says so, and still prints every stage and the hours
    assert f"note: init.hf_dir: {recipe.init.hf_dir} is not a Hugging Face model directory" in out
    for key in ("import", "data", "pretrain/pause", "pretrain/std", "finetune/PausePT/squad/append50/seed4",
                "evaluate/StdPT/gsm8k/none0/seed4/none0", "report"):
        assert any(line.split()[:1] == [key] for line in lines), key
    pretrain_hours = [float(line.split()[3]) for line in lines if line.startswith("pretrain/")]
    assert len(pretrain_hours) == 2 and all(h > 0.1 for h in pretrain_hours)
    assert "GPU-hours for the training stages" in out


def test_running_without_the_model_directory_is_refused_before_anything_runs(tmp_path, capsys):
    from pause_megatron.cli import main

    code = main(["recipe", "run", f"recipes/{NEW[0]}.yaml", f"output_dir={tmp_path / 'out'}", *FEW])
    err = capsys.readouterr().err
    assert code == 2 and "init.hf_dir: models/SmolLM2-135M is not a Hugging Face model directory" in err
    assert "nothing was run" in err and not (tmp_path / "out").exists()


def test_the_import_runs_as_one_cpu_process_locally_and_on_slurm(monkeypatch):
    from pause_megatron import recipe, slurm

    r = recipe.Recipe(name="x", output_dir="out", init=recipe.InitSpec(hf_dir="models/m"),
                      launch=recipe.LaunchSpec(executor="slurm", nproc=2, gpus_per_node=8))
    r.data.seq_length = 256
    stage = recipe.Stage("import", "import", [], "out/import", [])
    steps, res, cpu = recipe._stage_job(r, stage, python="py", parent="run1", recipe_path="x.yaml", overrides=[])
    assert steps == [["pause_megatron.cli", "import-hf", "models/m", "out/import/checkpoints", "--seq-length", "256"]]
    assert res["gpus_per_node"] == 0 and res["nodes"] == res["ntasks_per_node"] == 1 and cpu is None
    script = slurm.job_script(steps=steps, mark=["-m", "x"], home=".", python="py", cpu=cpu, title="t",
                              stop_dir="out/import")
    assert "run_step pause_megatron.cli import-hf models/m out/import/checkpoints" in script
    assert "PAUSE_REQUIRE_GPU" not in script
    monkeypatch.setenv("RANK", "3")  # locally, with launch.nproc=2 too: a plain process, a world of its own
    assert "RANK" not in recipe._local_env(r, "import") and recipe._local_env(r, "pretrain") is None


LR = 1e-4
STEPS = 2


def tiny_recipe(tmp_path, hf_dir) -> str:
    import yaml

    recipe = {
        "name": "tiny_continue", "output_dir": str(tmp_path / "out"), "variants": ["StdPT_StdFT", "PausePT_PauseFT"],
        "init": {"hf_dir": str(hf_dir)},
        # vocab_size is not used with init (the imported tokenizer is): a 600-piece one would differ from it
        "data": {"input": "sample", "sample_files": 1, "sample_docs_per_file": 150, "seq_length": 128,
                 "vocab_size": 600, "path": str(tmp_path / "out" / "data" / "c4_128")},
        "pretrain": {"config": "recipes/pretrain_tiny.yaml",
                     "overrides": ["parallel.tensor=1", f"train.steps={STEPS}", "train.eval_interval=0",
                                   "train.save_interval=0", "train.global_batch_size=4", "train.micro_batch_size=4",
                                   f"optim.lr={LR}", f"optim.min_lr={LR}", "optim.warmup_steps=0",
                                   "optim.weight_decay=0"]},
        "finetune": {"config": "recipes/finetune.yaml", "tasks": ["piqa"], "m_ft": [1], "seeds": [0],
                     "task_dir": "pause_megatron/sample_tasks",
                     "overrides": ["train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
                                   "optim.warmup_steps=0", "train.eval_interval=0", "precision.dtype=fp32"]},
        "evaluate": {"limit": 2},
        "launch": {"executor": "local", "nproc": 1},
        "tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny_continue"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def model_weights(iteration_dir) -> dict:
    """A checkpoint's model tensors, read by PyTorch's own distributed-checkpoint reader (not the project's)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = iteration_dir.parent / f"{iteration_dir.name}.pt"
    dcp_to_torch_save(str(iteration_dir), str(flat))
    state = torch.load(flat, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")
            and "_extra_state" not in k}


@pytest.mark.slow
def test_a_tiny_continued_pretraining_recipe_runs_end_to_end_from_the_imported_model(tiny_c4, tmp_path):
    import torch

    from test_hf import neox_without_pause

    hf_dir = tmp_path / "hf"
    neox_without_pause(tiny_c4, hf_dir)  # random GPT-NeoX, SentencePiece tokenizer without <pause>
    recipe = tiny_recipe(tmp_path, hf_dir)
    proc = python("-m", "pause_megatron.cli", "recipe", "run", recipe, timeout=1800)
    out = tmp_path / "out"
    assert "run  import" in proc.stdout and (out / "report" / "report.md").exists(), proc.stdout

    imported = out / "import" / "checkpoints"
    extra = torch.load(imported / "iter_0000000" / "common.pt", weights_only=False)["extra"]
    # the shards were tokenized with the tokenizer the import stored (not one data prep trained itself)
    manifest = json.loads((out / "data" / "c4_128" / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == extra["tokenizer_sha256"]
    assert manifest["tokenizer_source"]["given"].startswith(str(imported))

    start = model_weights(imported / "iter_0000000")
    for variant in ("std", "pause"):
        run = out / "pretrain" / variant
        # planned from the HF config.json: the shape the import wrote (its weights load into it)
        model = json.loads((run / "config.json").read_text())["model"]
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "rotary_base", "gelu", "seq_length"):
            assert model[key] == extra["config"]["model"][key], key
        # STEPS Adam steps at LR move no weight by more than ~LR each: the run started from the imported
        # weights (a fresh init differs by ~0.1, the HF model's initializer_range being 0.2)
        end = model_weights(run / "checkpoints" / f"iter_{STEPS:07d}")
        assert set(start) <= set(end)
        moved = max((end[k].float() - start[k].float()).abs().max().item() for k in start)
        assert 0 < moved <= 2 * STEPS * LR, (variant, moved)

    again = python("-m", "pause_megatron.cli", "recipe", "run", recipe, timeout=600).stdout
    ran = [line for line in again.splitlines() if line.startswith("[")]
    assert ran and all(" skip " in line for line in ran), again


def test_the_import_identity_follows_the_model_files_and_the_plan_takes_its_shape(tmp_path):
    import os

    hf = tmp_path / "hf"
    hf.mkdir()
    config = dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], vocab_size=500, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, max_position_embeddings=64,
                  rotary_pct=1.0, use_parallel_residual=False, rotary_emb_base=500, hidden_act="gelu_new")
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "tokenizer.model").write_bytes(b"pieces")
    (hf / "model.safetensors").write_bytes(b"weights")
    path = tiny_recipe(tmp_path, hf)

    def plan():
        return {k: (s.identity, s.argv) for k, s in plan_of(path)[1].items()}

    first = plan()
    argv = first["pretrain/pause"][1]
    # the HF config's shape comes after the pretrain config's (tiny: 4 layers, FFN 256), with data.seq_length
    for override in ("model.num_layers=2", "model.ffn_hidden_size=192", "model.rotary_base=500", "model.gelu=tanh",
                     "model.seq_length=128"):
        assert override in argv and argv.index(override) > argv.index("train.steps=2"), override
    (hf / "README.md").write_text("a model card")  # not read by the import
    (hf / ".cache").mkdir()
    assert plan() == first
    st = os.stat(hf / "model.safetensors")  # weights: by name, size and mtime
    os.utime(hf / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = plan()
    assert all(second[k][0] != first[k][0] for k in first)  # every stage follows the import
    (hf / "tokenizer.model").write_bytes(b"other!")  # tokenizer: by content (same size)
    assert plan()["import"][0] != second["import"][0]
    config["hidden_act"] = "gelu"
    (hf / "config.json").write_text(json.dumps(config))
    assert "model.gelu=exact" in plan()["pretrain/std"][1]


def test_an_import_stopped_after_writing_its_checkpoint_is_marked_done_not_run_again(tmp_path):
    from pause_megatron import recipe

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="gpt_neox", vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=192, max_position_embeddings=64, rotary_pct=1.0, use_parallel_residual=False)))
    r, stages = plan_of(tiny_recipe(tmp_path, hf), "stages=[import]")
    stage = stages["import"]
    recipe.claim(stage)  # the run that was stopped: claimed, its checkpoint root renamed into place, no marker
    (tmp_path / "out" / "import" / "checkpoints").mkdir()
    lines = []
    assert recipe.run(r, recipe_path="x.yaml", log=lines.append) == 0 and recipe.is_done(stage)
    assert not (tmp_path / "out" / "import" / "stage.log").exists(), lines  # import-hf was not started
