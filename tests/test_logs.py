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
