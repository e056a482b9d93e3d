"""Rank and rendezvous from torchrun or Slurm variables."""

import pytest

from pause_megatron.runtime import dist_env, first_host


@pytest.mark.parametrize("nodelist,host", [("n1", "n1"), ("gpu[003-005,9]", "gpu003"), ("a[7],b[1-2]", "a7"),
                                           ("node-01,node-02", "node-01"), ("c[12-13]", "c12")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_variables_win():
    env = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "h", 1234)


def test_slurm_variables_one_task_per_rank():
    env = dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[010-013]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "gpu010")
    assert env.master_port == 20000 + 4242
    # every job's port lies below the ephemeral range 32768-60999 (outgoing connections take ports there)
    ports = {dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1",
                       "SLURM_JOB_ID": str(j)}).master_port for j in range(0, 100000, 7)}
    assert min(ports) >= 20000 and max(ports) < 32768


def test_a_lone_process_gets_a_free_port():
    env = dist_env({})
    assert (env.rank, env.world_size) == (0, 1) and env.master_port > 0


def test_a_one_rank_local_stage_runs_without_torchrun_and_alone_inside_another_job(monkeypatch):
    """recipe run starts a one-rank stage as plain `python -m ...` (torchrun costs ~2 s a stage); run from a
    shell inside a torchrun or Slurm job, the stage must still be a world of one with its own port."""
    from pause_megatron import recipe

    r = recipe.Recipe(name="x", output_dir="out")
    stage = recipe.Stage("finetune/x", "finetune", ["-m", "pause_megatron.finetune", "task=piqa"], "out/x", [])
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n1")
    assert recipe._local_command(stage, r, "py", None) == ["py", "-m", "pause_megatron.finetune", "task=piqa"]
    env = dist_env(recipe._local_env(r))
    assert (env.rank, env.world_size) == (0, 1) and env.master_port != 1234
    r.launch.nproc = 2  # several ranks: torchrun, which sets the rank variables itself
    assert recipe._local_command(stage, r, "py", None)[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert recipe._local_env(r) is None
