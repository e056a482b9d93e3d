"""The report's 95% intervals, checked against their definitions, and its line when they overlap."""

import math

import pytest

from pause_megatron import report


def wilson_by_inversion(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson interval from its definition: every p0 whose score test |p - p0| <= z sqrt(p0 (1-p0) / n)
    does not reject, found by bisection on each side of p."""
    def accepted(p0):
        return abs(p - p0) <= z * math.sqrt(p0 * (1 - p0) / n)

    def edge(inside, outside):
        for _ in range(100):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if accepted(mid) else (inside, mid)
        return inside

    inner = min(max(p, 1e-12), 1 - 1e-12)
    return (0.0 if accepted(0.0) else edge(inner, 0.0)), (1.0 if accepted(1.0) else edge(inner, 1.0))


@pytest.mark.parametrize("k,n", [(0, 32), (32, 32), (16, 32), (3, 10), (57, 200)])
def test_wilson_interval_matches_its_definition(k, n):
    lo, hi = report.wilson(k / n, n)
    ref_lo, ref_hi = wilson_by_inversion(k / n, n)
    assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)
    if k == n:  # 100% on 32 rows is not certainty: the interval reaches well below
        assert hi == 1.0 and lo < 0.9


def rows(metric, values, n, sd=None, variant="A"):
    return [{"metric": metric, "value": v, "n": n, "sd": sd, "variant": variant} for v in values]


def test_cell_reports_rows_seeds_and_interval():
    cell = report._cell(rows("acc", [50.0, 50.0], 32))
    lo, hi = report.wilson(0.5, 32)
    assert f"[{lo * 100:.1f}, {hi * 100:.1f}]" in cell and "n=32" in cell and "2 seeds" in cell
    assert "[no interval: row count not logged]" in report._cell(rows("acc", [50.0], None))  # an older run


@pytest.mark.parametrize("metric,n,sd,shown", [
    ("acc", 0, None, "[no interval: no rows scored]"), ("f1", 0, 10.0, "[no interval: no rows scored]"),
    ("f1", 1, 10.0, "[no interval (n=1)]"), ("f1", 32, None, "[no interval: per-document sd not logged]")])
def test_cells_without_an_interval_say_why(metric, n, sd, shown):
    cell = report._cell(rows(metric, [0.0], n, sd=sd))  # n=0 used to divide by zero in wilson()
    assert shown in cell and f"n={n}" in cell
    assert report.interval(rows(metric, [0.0], n, sd=sd)) is None
    assert report.overlap_notes({"t": {"A": rows(metric, [0.0], n, sd=sd), "B": rows(metric, [0.0], n, sd=sd)}}) == []


def test_f1_interval_is_the_normal_interval_of_the_mean():
    lo, hi = report.interval(rows("f1", [40.0, 60.0], 25, sd=30.0))
    assert (lo + hi) / 2 == pytest.approx(50.0) and hi - lo == pytest.approx(2 * 1.959964 * 30.0 / 5)


def test_overlapping_intervals_get_a_line_and_separated_ones_do_not():
    close = {"piqa": {"A": rows("acc", [50.0], 32), "B": rows("acc", [56.25], 32, variant="B")}}
    [line] = report.overlap_notes(close)
    assert "piqa" in line and "overlaps" in line and "n=32" in line
    assert "evaluation noise" in line and "paired comparison" in line  # not a claim that the variants are equal
    apart = {"piqa": {"A": rows("acc", [0.0], 400), "B": rows("acc", [100.0], 400, variant="B")}}
    assert report.overlap_notes(apart) == []


@pytest.mark.parametrize("xs", [[2], [3, 4], [1, 5, 9]])
def test_step_axes_have_integer_ticks_even_for_one_point(xs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(xs, [1.0] * len(xs), marker="o")
    report.integer_axis(ax, xs)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    plt.close(fig)
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # one point used to get 1.900, 1.925 ...
