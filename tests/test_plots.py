import itertools

import matplotlib.pyplot as plt
import pytest

from pfedlora import plots


def _records(bytes_per_round, flops_per_round, accuracies):
    return [
        {
            "round": r,
            "cumulative_bytes": bytes_per_round * r,
            "cumulative_train_flops": flops_per_round * r,
            "mean_accuracy": accuracy,
        }
        for r, accuracy in enumerate(accuracies, start=1)
    ]


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots draw, kept open to be inspected."""
    kept, close = [], plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def test_bytes_and_flops_are_on_log_axes_and_what_sends_nothing_is_marked_at_the_left_edge(tmp_path, figures):
    runs = [
        ("pfedlora", _records(2e6, 1e12, [0.5, 0.6, 0.7])),
        ("fedapen", _records(2e9, 2e12, [0.4, 0.6, 0.8])),  # three orders of magnitude more bytes
        ("standalone", _records(0, 1e12, [0.3, 0.4, 0.5])),
    ]
    paths = plots.plot_runs(runs, tmp_path)
    assert [p.name for p in paths] == [
        "accuracy_per_round.png",
        "accuracy_vs_megabytes.png",
        "accuracy_vs_tflops.png",
    ]
    per_round, megabytes, tflops = (figure.axes[0] for figure in figures)
    assert per_round.get_xscale() == "linear"
    assert megabytes.get_xscale() == "log" and tflops.get_xscale() == "log"
    lines = {line.get_label(): line for line in megabytes.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"pfedlora", "fedapen", "standalone (at 0, drawn at the left edge)"}
    assert list(lines["pfedlora"].get_xdata()) == pytest.approx([2, 4, 6])  # MB
    edge = list(lines["standalone (at 0, drawn at the left edge)"].get_xdata())
    assert edge == pytest.approx([0.2] * 3)  # a tenth of the smallest positive x: visible, left of all
    assert megabytes.get_xlim()[0] < 0.2 < 2
    assert "log scale" in megabytes.get_xlabel()
    assert {line.get_label() for line in tflops.get_lines()} >= {"pfedlora", "fedapen", "standalone"}


def test_the_left_edge_is_marked_only_where_something_is_drawn_there(tmp_path, figures):
    def edge_lines(axes):
        return [line for line in axes.get_lines() if line.get_linestyle() == ":"]

    sending = [("pfedlora", _records(2e6, 1e12, [0.5, 0.6])), ("fedapen", _records(2e9, 2e12, [0.4, 0.6]))]
    plots.plot_runs(sending, tmp_path / "sending")
    plots.plot_runs([*sending, ("standalone", _records(0, 1e12, [0.3, 0.4]))], tmp_path / "with-zero")
    megabytes_sending, megabytes_with_zero = figures[1].axes[0], figures[4].axes[0]
    assert edge_lines(megabytes_sending) == []
    assert len(edge_lines(megabytes_with_zero)) == 1


def test_the_legend_sits_beside_the_axes_not_over_the_curves(tmp_path, figures):
    plots.plot_runs([(f"method-{i}", _records(2e6 * 10**i, 1e12, [0.4, 0.6])) for i in range(9)], tmp_path)
    for figure in figures:
        figure.canvas.draw()
        axes = figure.axes[0]
        legend = axes.get_legend().get_window_extent()
        assert legend.x0 >= axes.get_window_extent().x1  # right of the plotting area
        assert legend.x1 <= figure.bbox.x1  # and still inside the saved figure


def test_rounds_get_whole_ticks(tmp_path, figures):
    plots.plot_runs([("pfedlora", _records(2e6, 1e12, [0.5, 0.6, 0.7]))], tmp_path)  # rounds 1 to 3
    per_round = figures[0].axes[0]
    figures[0].canvas.draw()
    ticks = [t for t in per_round.get_xticks() if per_round.get_xlim()[0] <= t <= per_round.get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_a_log_axis_spanning_little_more_than_a_decade_has_plain_tick_labels_that_do_not_overlap(
    tmp_path, figures
):
    # The language-model pages' case: 20 to 45 TFLOPs, and the zero-shot base at 0 drawn at 2.
    runs = [
        ("pfedlora", _records(45e6, 20.4e12, [0.5, 0.6])),
        ("flora", _records(660e6, 22.4e12, [0.4, 0.6])),
        ("zero-shot", _records(0, 0, [0.3, 0.3])),
    ]
    plots.plot_runs(runs, tmp_path)
    figure = figures[2]
    figure.canvas.draw()
    axis = figure.axes[0].xaxis
    labels = [*axis.get_ticklabels(), *axis.get_ticklabels(minor=True)]
    shown = [label for label in labels if label.get_text()]
    assert len(shown) >= 3
    assert all("10^" not in label.get_text() for label in shown)  # 2, 3, 10, 20, not 2×10⁰
    boxes = sorted((label.get_window_extent() for label in shown), key=lambda box: box.x0)
    assert all(left.x1 <= right.x0 for left, right in itertools.pairwise(boxes))


@pytest.mark.parametrize(
    ("rounds", "every", "expected_step"), [(60, 5, 5), (24, 3, 3), (500, 25, 50), (12, 1, 1), (60, 1, 5)]
)
def test_round_ticks_fall_on_evaluated_rounds(tmp_path, figures, rounds, every, expected_step):
    records = [
        {"round": r, "cumulative_bytes": 1e6 * r, "cumulative_train_flops": 1e12 * r}
        | ({"mean_accuracy": r / rounds} if r % every == 0 else {})
        for r in range(1, rounds + 1)
    ]
    plots.plot_runs([("pfedlora", records)], tmp_path)
    figures[0].canvas.draw()
    per_round = figures[0].axes[0]
    low, high = per_round.get_xlim()
    ticks = [int(t) for t in per_round.get_xticks() if low <= t <= high]
    assert ticks == list(range(ticks[0], ticks[-1] + 1, expected_step))
    assert ticks[0] <= expected_step and ticks[-1] >= rounds - expected_step + 1
    assert all(t % every == 0 for t in ticks)
