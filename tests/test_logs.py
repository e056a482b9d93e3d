"""Logs stay readable in a batch log: progress bars as plain lines, kernels stated in one line."""

from pause_megatron import kernels, progress


def test_progress_bar_in_a_file_writes_plain_lines(capsys):
    with progress.bar(total=3, unit="step", desc="train") as bar:  # capsys: stderr is not a terminal
        for _ in range(3):
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    assert err.splitlines()[-1].startswith("train: 100%") and "3/3" in err.splitlines()[-1]


def test_kernel_summary_is_one_line_naming_every_decision():
    present = kernels.Present(cuda=False, apex=False, transformer_engine=False, grad_accum_kernel=False)
    k = kernels.choose(present)
    line = kernels.summary(k, present)
    assert "\n" not in line and line.startswith("kernels: local spec")
    assert "apex no" in line and "on: sdpa_attention" in line
    assert all(name in line for name in k.reasons if name != "spec")


def test_library_progress_bars_are_off_in_a_log_and_ours_stay(tmp_path):
    """lm-eval's and `datasets`' bars (tqdm redraws with carriage returns) are off when stderr is a file, as in
    a stage.log; pause_megatron's own bar still writes its plain lines."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, subprocess_env

    env = {k: v for k, v in subprocess_env().items()
           if k not in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS")}  # as a user's job starts
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    code = ("import pause_megatron, datasets\n"
            "from tqdm import tqdm\n"
            "from lm_eval.api import task\n"  # lm-eval draws its bars with tqdm's defaults
            "list(tqdm(range(3), desc='library'))\n"
            f"datasets.load_dataset('json', data_files={{'rows': {str(tmp_path / 'rows.jsonl')!r}}}, split='rows',"
            f" cache_dir={str(tmp_path / 'cache')!r})\n"
            "from pause_megatron import progress\n"
            "list(progress.bar(range(3), desc='ours'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "library" not in proc.stderr and "Generating" not in proc.stderr
    assert "ours: 100%" in proc.stderr
