import math

import pytest
import torch

from pfedlora.metrics import AccuracyReport, Channel, FlopMeter, payload_bytes, summarize_curve
from pfedlora.metrics.accuracy import change_over_last_tenth


def test_payload_bytes_counts_numel_times_element_size():
    payload = {
        "f32": torch.zeros(3, 4),
        "f16": torch.zeros(5, dtype=torch.float16),
        "i64": torch.zeros(2, dtype=torch.int64),
    }
    assert payload_bytes(payload) == 3 * 4 * 4 + 5 * 2 + 2 * 8


def test_channel_counts_per_client_and_direction_and_copies():
    channel = Channel()
    sent = {"w": torch.ones(10)}
    received = channel.download(3, sent)
    channel.download(3, sent)
    channel.upload(7, {"w": torch.ones(2, 2, dtype=torch.float64)})
    assert channel.bytes_down == {3: 80}
    assert channel.bytes_up == {7: 32}
    assert (channel.total_down, channel.total_up) == (80, 32)
    received["w"].add_(1)  # the receiver's copy is its own
    assert sent["w"].sum().item() == 10


def test_accuracy_report_mean_weighted_std():
    report = AccuracyReport(correct=(9, 1, 30), totals=(10, 10, 40))
    assert report.per_client == (0.9, 0.1, 0.75)
    assert report.mean == pytest.approx((0.9 + 0.1 + 0.75) / 3)
    assert report.weighted == pytest.approx(40 / 60)
    mean = (0.9 + 0.1 + 0.75) / 3
    assert report.std == pytest.approx(
        math.sqrt(((0.9 - mean) ** 2 + (0.1 - mean) ** 2 + (0.75 - mean) ** 2) / 3)
    )


def test_clients_without_evaluation_samples_are_left_out_of_the_means():
    report = AccuracyReport(correct=(9, 0, 30, 0), totals=(10, 0, 40, 0))
    assert report.per_client == (0.9, None, 0.75, None)
    assert report.without_samples == 2
    assert report.mean == pytest.approx((0.9 + 0.75) / 2)
    assert report.std == pytest.approx(0.075)
    assert report.weighted == pytest.approx(39 / 50)
    assert math.isnan(AccuracyReport(correct=(0,), totals=(0,)).mean)


def test_summarize_curve():
    summary = summarize_curve(
        [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22], [0.1, 0.5, 0.4] + [0.3] * 6 + [0.2, 0.6]
    )
    assert summary["mean_accuracy_best"] == 0.6
    assert summary["best_round"] == 22
    assert summary["mean_accuracy_last"] == 0.6
    # 11 evaluations: the last 10% rounds up to 2 of them.
    assert summary["mean_accuracy_last10pct"] == pytest.approx(0.4)


def test_flop_meter_counts_first_step_and_scales_by_samples():
    layer = torch.nn.Linear(10, 20, bias=False)
    meter = FlopMeter()
    meter.run("fwd", 4, lambda: layer(torch.zeros(4, 10)))
    assert meter.total == 2 * 4 * 10 * 20  # one (4x10)@(10x20) matmul
    meter.run("fwd", 6, lambda: layer(torch.zeros(6, 10)))
    assert meter.total == 2 * 10 * 10 * 20
    assert meter.samples == 10
    assert meter.reset() == 4000
    assert meter.total == 0


def test_flop_meter_charges_quadratic_steps_from_the_parabola_through_three_counts_checked_on_a_fourth():
    head, body = torch.nn.Linear(10, 20, bias=False), torch.nn.Linear(8, 8, bias=False)

    def step(items):  # fixed, linear and quadratic parts, as a language model's on its packed real tokens
        row = torch.zeros(items, 8)
        return lambda: (body(torch.zeros(3, 8)), head(torch.zeros(items, 10)), row @ row.T)

    meter, sizes = FlopMeter(), [5, 7, 5, 9, 3, 11, 7, 20]
    for items in sizes:
        meter.run("lm", 3, step(items), items=items)
    exact = [2 * 3 * 8 * 8 + 2 * items * 10 * 20 + 2 * items * 8 * items for items in sizes]
    assert meter.total == sum(exact)  # as if every step were counted
    assert meter.counted_steps == 4  # 5, 7 and 9 give the parabola, 3 confirms it; 11, 7 and 20 are charged
    assert meter.samples == 3 * len(sizes)


def test_flop_meter_counts_every_distinct_size_where_the_steps_are_not_quadratic():
    layer = torch.nn.Linear(4, 4, bias=False)

    def step(n):  # (n x n) @ (n x n): cubic in n
        return lambda: torch.zeros(n, n) @ torch.zeros(n, n) + layer(torch.zeros(1, 4)).sum()

    meter, sizes = FlopMeter(), [2, 3, 4, 5, 3, 6, 5]
    for n in sizes:
        meter.run("cubic", 1, step(n), items=n)
    assert meter.total == sum(2 * n**3 + 2 * 4 * 4 for n in sizes)
    assert meter.counted_steps == 5  # 5 is off the parabola through 2, 3 and 4: every new size is counted


def test_flop_meter_fits_the_parabola_on_short_steps_and_checks_it_on_the_first_full_step():
    head = torch.nn.Linear(10, 20, bias=False)

    def step(items):  # linear and quadratic parts, as a language model's on its packed real tokens
        row = torch.zeros(items, 8)
        return lambda: (head(torch.zeros(items, 10)), row @ row.T)

    def short():  # the first batch cut short: 2, 3, 3 again and 4 items
        return [(n, step(n)) for n in (2, 3, 3, 4)]

    meter, sizes = FlopMeter(), [20, 30, 20, 41]
    for items in sizes:
        meter.run("lm", 3, step(items), items=items, fit=short)
    assert meter.total == sum(2 * items * 10 * 20 + 2 * items * 8 * items for items in sizes)
    assert (meter.counted_short, meter.counted_steps) == (3, 1)  # 2, 3, 4 fit; 20 checks; 30, 41 charged


def test_flop_meter_counts_every_full_size_where_the_short_steps_parabola_fails():
    def step(n):  # cubic in n
        return lambda: torch.zeros(n, n) @ torch.zeros(n, n)

    meter, sizes = FlopMeter(), [5, 6, 5]
    for n in sizes:
        meter.run("cubic", 1, step(n), items=n, fit=lambda: [(k, step(k)) for k in (2, 3, 4)])
    assert meter.total == sum(2 * n**3 for n in sizes)
    assert (meter.counted_short, meter.counted_steps) == (3, 2)  # 5 is off the parabola: 5 and 6 counted


def test_frozen_weights_cost_less_in_backward():
    layer = torch.nn.Linear(10, 20, bias=False)
    x = torch.zeros(4, 10, requires_grad=True)
    meter = FlopMeter()
    meter.run("both", 4, lambda: layer(x).sum().backward())
    layer.weight.requires_grad_(False)
    meter.run("input-only", 4, lambda: layer(x).sum().backward())
    assert meter.per_sample["both"] == 3 * 2 * 10 * 20  # forward + grad input + grad weight
    assert meter.per_sample["input-only"] == 2 * 2 * 10 * 20


def test_change_over_last_tenth_interpolates_the_start_of_the_window():
    assert change_over_last_tenth([50, 55, 60], [0.80, 0.85, 0.86], 60) == pytest.approx(0.86 - 0.84)
    assert change_over_last_tenth([9, 10], [0.5, 0.7], 10) == pytest.approx(0.2)  # from round 9 exactly
    assert change_over_last_tenth([10, 20], [0.5, 0.7], 20) == pytest.approx(0.2 - 0.8 * 0.2)
    assert change_over_last_tenth([20], [0.7], 20) is None  # no evaluation at or before round 18
    assert change_over_last_tenth([], [], 20) is None
