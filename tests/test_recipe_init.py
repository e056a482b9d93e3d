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
    assert recipe.data.path.startswith(f"{recipe.output_dir}/data/")  # set aside with the data stage
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
    assert "GPU-hours (estimated, not measured on a GPU) for pretraining" in out


def test_running_without_the_model_directory_is_refused_before_anything_runs(tmp_path, capsys):
    from pause_megatron.cli import main

    code = main(["recipe", "run", f"recipes/{NEW[0]}.yaml", f"output_dir={tmp_path / 'out'}", *FEW])
    err = capsys.readouterr().err
    assert code == 2 and "init.hf_dir: models/SmolLM2-135M is not a Hugging Face model directory" in err
    assert "nothing was run" in err and not (tmp_path / "out").exists()


def test_the_import_runs_as_one_cpu_process_locally_and_on_slurm_with_memory_for_the_model(monkeypatch, tmp_path):
    from pause_megatron import recipe, slurm

    r = recipe.Recipe(name="x", output_dir="out", init=recipe.InitSpec(hf_dir="models/m"),
                      launch=recipe.LaunchSpec(executor="slurm", nproc=2, gpus_per_node=8))
    r.data.seq_length = 256
    stage = recipe.Stage("import", "import", [], "out/import", [])
    steps, res, cpu = recipe._stage_job(r, stage, python="py", parent="run1", recipe_path="x.yaml", overrides=[])
    assert steps == [["pause_megatron.recipe", "import", "models/m", "out/import/checkpoints", "256",
                      "out/import/checkpoints"]]
    assert res["gpus_per_node"] == 0 and res["nodes"] == res["ntasks_per_node"] == 1 and cpu is None
    assert res["mem_gb"] == 16  # no model there yet: the floor
    script = slurm.job_script(steps=steps, mark=["-m", "x"], home=".", python="py", cpu=cpu, title="t",
                              stop_dir="out/import")
    assert "run_step pause_megatron.recipe import models/m out/import/checkpoints" in script
    assert "--mem=16G" in slurm.sbatch_command(script, name="n", out_dir="o", time="1:00:00", signal=None, deps=[],
                                               extra=[], workdir=".", comment="c", **res)
    assert "PAUSE_REQUIRE_GPU" not in script
    monkeypatch.setenv("RANK", "3")  # locally, with launch.nproc=2 too: a plain process, a world of its own
    assert "RANK" not in recipe._local_env(r, "import") and recipe._local_env(r, "pretrain") is None
    models = tmp_path / "m"  # 2.5 GB of bf16 weights: 5 GB as fp32, three times over, and 8 GB besides
    models.mkdir()
    for i in (1, 2):
        with open(models / f"model-0000{i}-of-00002.safetensors", "wb") as fh:
            fh.truncate(1_250_000_000)
    (models / "tokenizer.json").write_bytes(b"x" * 10**8)  # not weights
    r.init.hf_dir = str(models)
    assert recipe._stage_job(r, stage, python="py", parent=None, recipe_path="x", overrides=[])[1]["mem_gb"] == 23


LR = 1e-4
STEPS = 2


def tiny_recipe(tmp_path, hf_dir, variants=("StdPT_StdFT", "PausePT_PauseFT"), stages=None, **data) -> str:
    import yaml

    recipe = {
        "name": "tiny_continue", "output_dir": str(tmp_path / "out"), "variants": list(variants),
        **({"stages": list(stages)} if stages else {}),
        "init": {"hf_dir": str(hf_dir)},
        # vocab_size is not used with init (the imported tokenizer is): a 600-piece one would differ from it
        "data": {"input": "sample", "sample_files": 1, "sample_docs_per_file": 100, "seq_length": 128,
                 "vocab_size": 600, "path": str(tmp_path / "out" / "data" / "c4_128"), **data},
        "pretrain": {"config": "recipes/pretrain_tiny.yaml",
                     "overrides": ["parallel.tensor=1", f"train.steps={STEPS}", "train.eval_interval=0",
                                   "train.save_interval=0", "train.global_batch_size=4", "train.micro_batch_size=4",
                                   f"optim.lr={LR}", f"optim.min_lr={LR}", "optim.warmup_steps=0",
                                   "optim.weight_decay=0"]},
        "finetune": {"config": "recipes/finetune.yaml", "tasks": ["piqa"], "m_ft": [1], "seeds": [0],
                     "task_dir": "pause_megatron/sample_tasks",
                     "overrides": ["train.steps=1", "train.global_batch_size=2", "train.micro_batch_size=2",
                                   "optim.warmup_steps=0", "train.eval_interval=0", "precision.dtype=fp32"]},
        "evaluate": {"limit": 1},
        "launch": {"executor": "local", "nproc": 1},
        "tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny_continue"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


# A tiny Llama (SmolLM2's features: GQA, SwiGLU, RMSNorm, tied embeddings, a large RoPE base) whose every shape
# key differs from the tiny preset's (4 layers, hidden 64, 4 heads, FFN 256): a recipe that planned any of them
# from the pretrain config instead of the model's config.json would fail to load the weights or be refused
# (checkpoint.check_init_from_model).
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=48, num_hidden_layers=2,
             num_attention_heads=3, num_key_value_heads=1, intermediate_size=96, max_position_embeddings=128,
             rope_theta=100000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
             initializer_range=0.2)


def tiny_llama(tiny_c4, out) -> None:
    """A random transformers Llama saved at `out` with the corpus's SentencePiece tokenizer minus <pause>."""
    import torch
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import LlamaConfig, LlamaForCausalLM

    proto = pb.ModelProto()
    proto.ParseFromString((tiny_c4 / "tokenizer.model").read_bytes())
    del proto.pieces[-1]  # <pause>: a model from elsewhere has never heard of it
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures")},
                                         vocab_size=len(proto.pieces)))
    with torch.no_grad():  # norms unlike 1, so that a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())


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
def test_a_tiny_continued_pretraining_recipe_runs_end_to_end_from_an_imported_llama(tiny_c4, tmp_path):
    import torch

    from pause_megatron import recipe as rc

    hf_dir = tmp_path / "hf"
    tiny_llama(tiny_c4, hf_dir)
    # one variant and no report, for time: StdPT's stages are PausePT's with other shards (the plan test checks
    # both start from the import), the report is the one every recipe makes
    path = tiny_recipe(tmp_path, hf_dir, variants=["PausePT_PauseFT"],
                       stages=["import", "data", "pretrain", "finetune", "evaluate"])
    out = tmp_path / "out"
    imported = out / "import" / "checkpoints"
    # a folder at the import's root that is no finished import (an empty one): set aside, not trusted
    rc.claim(rc.full_plan(rc.load_recipe(path))[0], log=lambda _: None)
    imported.mkdir()
    proc = python("-m", "pause_megatron.cli", "recipe", "run", path, timeout=1800)
    assert "run  import" in proc.stdout and (out / "evaluate").is_dir(), proc.stdout
    assert "has no `latest`: set aside as" in proc.stdout and (out / "import" / "checkpoints.replaced").is_dir()

    extra = torch.load(imported / "iter_0000000" / "common.pt", weights_only=False)["extra"]
    # the shards were tokenized with the tokenizer the import stored (not one data prep trained itself)
    manifest = json.loads((out / "data" / "c4_128" / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == extra["tokenizer_sha256"]
    assert manifest["tokenizer_source"]["given"].startswith(str(imported))

    start = model_weights(imported / "iter_0000000")
    run = out / "pretrain" / "pause"
    # planned from the HF config.json: the model the import wrote (check_init_from_model let it start)
    model = json.loads((run / "config.json").read_text())["model"]
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "rotary_base", "norm_epsilon", "mlp", "normalization", "untie_embeddings", "seq_length"):
        assert model[key] == extra["config"]["model"][key], key
    assert (model["hidden_size"], model["num_query_groups"], model["rotary_base"]) == (48, 1, 100000)
    # STEPS Adam steps at LR move no weight by more than ~LR each: the run started from the imported
    # weights (a fresh init differs by ~0.1, the HF model's initializer_range being 0.2)
    end = model_weights(run / "checkpoints" / f"iter_{STEPS:07d}")
    assert set(start) <= set(end)
    moved = max((end[k].float() - start[k].float()).abs().max().item() for k in start)
    assert 0 < moved <= 2 * STEPS * LR, moved
    finetuned = list((out / "finetune").glob("*/*/*/*/config.json"))  # from the pretraining: the same model
    assert finetuned and all(json.loads(f.read_text())["model"]["num_query_groups"] == 1 for f in finetuned)

    # an import stopped after its checkpoint was renamed into place, before its marker: marked done, not rerun
    # (locally, and by a requeued Slurm job's command)
    (out / "import" / "stage.json").unlink()
    (out / "import" / "stage.log").unlink()
    again = python("-m", "pause_megatron.cli", "recipe", "run", path, timeout=600).stdout
    ran = [line for line in again.splitlines() if line.startswith("[")]
    assert ran and all(" skip " in line for line in ran[1:]) and "run  import" in ran[0], again
    assert rc.read_marker(str(out / "import"))["done"] and not (out / "import" / "stage.log").exists(), again
    job = python("-m", "pause_megatron.recipe", "import", str(hf_dir), str(imported), "128",
                 str(imported)).stdout
    assert "not imported again" in job


def write_hf_config(hf, **config) -> dict:
    hf.mkdir(exist_ok=True)
    config = {**LLAMA, "vocab_size": 500, **config}
    (hf / "config.json").write_text(json.dumps(config))
    return config


def test_the_import_identity_follows_the_model_files_by_content_and_the_plan_takes_its_model(tmp_path):
    import os
    import shutil

    hf = tmp_path / "hf"
    config = write_hf_config(hf)
    (hf / "tokenizer.model").write_bytes(b"pieces")
    (hf / "model.safetensors").write_bytes(b"weights" * 1000)
    path = tiny_recipe(tmp_path, hf)

    def plan(p=path):
        return {k: (s.identity, s.argv) for k, s in plan_of(p)[1].items()}

    first = plan()
    argv = first["pretrain/pause"][1]
    # import-hf's own overrides (hf.hf_model_overrides), after the pretrain config's (tiny: 4 layers, FFN 256,
    # LayerNorm, a GELU MLP with biases), with data.seq_length
    for override in ("model.num_layers=2", "model.hidden_size=48", "model.num_attention_heads=3",
                     "model.num_query_groups=1", "model.ffn_hidden_size=96", "model.rotary_base=100000",
                     "model.norm_epsilon=1e-06", "model.mlp=swiglu", "model.normalization=RMSNorm",
                     "model.linear_bias=none", "model.untie_embeddings=false", "model.seq_length=128"):
        assert override in argv and argv.index(override) > argv.index("train.steps=2"), override
    (hf / "README.md").write_text("a model card")  # not read by the import
    (hf / ".cache").mkdir()
    assert plan() == first
    # weights by content: a byte-identical copy (new mtimes) keeps every identity, one changed byte changes them
    copy = tmp_path / "copy"
    shutil.copytree(hf, copy)  # new mtimes
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert {k: i for k, (i, _) in plan(tiny_recipe(tmp_path, copy)).items()} == {k: i for k, (i, _) in first.items()}
    (hf / "model.safetensors").write_bytes(b"weights" * 999 + b"weightS")
    second = plan(tiny_recipe(tmp_path, hf))  # the same size
    assert all(second[k][0] != first[k][0] for k in first)  # every stage follows the import
    (hf / "tokenizer.model").write_bytes(b"other!")  # tokenizer: by content (same size)
    assert plan()["import"][0] != second["import"][0]
    write_hf_config(hf, rope_theta=500000.0)
    assert "model.rotary_base=500000" in plan()["pretrain/std"][1]
    # data.vocab_size does not make the shards with init (the imported tokenizer does): not in their identity
    data = plan()["data"][0]
    assert plan(tiny_recipe(tmp_path, hf, vocab_size=700))["data"][0] == data


def test_a_folder_at_the_import_root_that_is_no_finished_import_is_set_aside_and_imported_again(tmp_path):
    from pause_megatron import recipe

    hf = tmp_path / "hf"
    write_hf_config(hf)
    r, stages = plan_of(tiny_recipe(tmp_path, hf), "stages=[import]")
    root = tmp_path / "out" / "import" / "checkpoints"
    root.mkdir(parents=True)  # empty: no `latest`, no complete checkpoint
    lines = []
    assert recipe.prepare_import(str(root), str(hf), 128, recipe.import_tokenizer(r), log=lines.append) is False
    assert not root.exists() and (root.parent / "checkpoints.replaced").is_dir(), lines
    root.mkdir()
    (root / "latest").write_text("iter_0000000\n")  # names a checkpoint that never completed
    (root / "iter_0000000").mkdir()
    assert recipe.prepare_import(str(root), str(hf), 128, recipe.import_tokenizer(r), log=lines.append) is False
    assert (root.parent / "checkpoints.replaced.2" / "latest").exists() and "is not complete" in lines[-1]


def test_a_new_models_shards_are_made_anew_and_the_old_ones_kept(tmp_path):
    from pause_megatron import recipe
    from pause_megatron.config import ConfigError

    hf = tmp_path / "hf"
    write_hf_config(hf)
    (hf / "tokenizer.model").write_bytes(b"one tokenizer")
    path = tiny_recipe(tmp_path, hf)
    stage = plan_of(path)[1]["data"]
    recipe.claim(stage)
    shards = tmp_path / "out" / "data" / "c4_128"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")  # built with the first model's tokenizer
    recipe.mark_done(stage)
    (hf / "tokenizer.model").write_bytes(b"another one")  # another model: its data stage runs again
    new = plan_of(path)[1]["data"]
    assert new.identity != stage.identity
    recipe.claim(new)  # build_c4 then finds no shards to refuse: it builds them with the new tokenizer
    assert not shards.exists()
    assert (tmp_path / "out" / f"data.replaced-{stage.identity}" / "c4_128" / "manifest.json").exists()
    # shards outside the data stage's folder would stay where the new tokenizer's build refuses them: refused
    with pytest.raises(ConfigError, match=r"data.path .*c4 is outside .*out/data: with init.hf_dir"):
        plan_of(tiny_recipe(tmp_path, hf, path=str(tmp_path / "c4")))


def test_the_dry_run_counts_the_models_vocabulary_and_parameters_before_and_after_the_download(tmp_path):
    """The shipped SmolLM2 recipe's hours and disk are the same planned from its preset (before the download)
    and from SmolLM2-135M's config.json (after; model_type llama), and the disk is the published parameter count
    (134,515,008 at 49,152; one row more for <pause>, padded to 49,280) x 16 bytes x 3 checkpoints (the disk
    column's peak: the 2 kept and the one being saved)."""
    from pause_megatron import hf as hf_

    hf = tmp_path / "SmolLM2-135M"
    smollm2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                   max_position_embeddings=8192, rope_theta=100000, rms_norm_eps=1e-5, tie_word_embeddings=True,
                   hidden_act="silu", initializer_range=0.041666666666666664)
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(smollm2))

    def figures(*extra):
        lines = []
        from pause_megatron.recipe import print_plan

        recipe, _ = plan_of(f"recipes/{NEW[0]}.yaml", *FEW, f"output_dir={tmp_path / 'out'}", *extra)
        print_plan(recipe, log=lines.append)
        return {line.split()[0]: line.split()[3:] for line in lines if line.startswith("pretrain/")}, lines

    before, _ = figures()
    after, lines = figures(f"init.hf_dir={hf}")
    assert not any("note: init.hf_dir" in line for line in lines)
    assert before == after and float(after["pretrain/std"][0]) > 0.1
    params = 134_515_008 + 576 * (49280 - 49152)
    assert after["pretrain/std"][1:] == [f"{3 * 16 * params / 1e9:.1f}", "GB"]
    # <pause> already among the model's 49,152 (a tokenizer that declares it): no row added, no padding
    assert hf_.import_vocab_size(str(hf)) == 49280
    (hf / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"49151": {"content": "<pause>"}}}))
    assert hf_.import_vocab_size(str(hf)) == 49152


def test_a_model_of_another_architecture_than_the_recipes_preset_gets_every_architecture_key(tmp_path):
    """The SmolLM2 recipe (preset smollm2-135m: GQA, SwiGLU, RMSNorm, no biases) given a GPT-NeoX directory plans
    the NeoX model: the keys NeoX's config.json does not name come at the values import-hf gives them."""
    hf = tmp_path / "neox"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(
        model_type="gpt_neox", vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=192, max_position_embeddings=64, rotary_pct=1.0, use_parallel_residual=False)))
    _, stages = plan_of(f"recipes/{NEW[0]}.yaml", *FEW, f"output_dir={tmp_path / 'out'}", f"init.hf_dir={hf}")
    argv = stages["pretrain/std"].argv
    for override in ("model.mlp=gelu", "model.num_query_groups=null", "model.linear_bias=all",
                     "model.normalization=LayerNorm", "model.rope_scaling_factor=null", "model.untie_embeddings=true"):
        assert override in argv, override
