"""Arrival schedules and --ramp parsing (pure)."""

from __future__ import annotations

import itertools

import pytest

from anonjoin import ConfigurationError
from anonjoin._load.runner import (
    ConstantRate,
    LinearRamp,
    LoadPlan,
    RateFunction,
    Steps,
    parse_ramp,
    pool_size,
)


def test_constant_rate() -> None:
    assert list(ConstantRate(4).times(5)) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ConfigurationError):
        ConstantRate(0)


def test_linear_ramp_accelerates_then_holds() -> None:
    times = list(LinearRamp(10, 30, 10).times(500))
    assert times == sorted(times)
    assert times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx(0.1, rel=0.05)  # 10/s at the start
    assert gaps[150] < gaps[10]  # faster later in the ramp
    # 200 guests arrive during the 10 s ramp ((10 + 30) / 2 * 10), then 30/s.
    assert times[200] == pytest.approx(10.0, abs=0.01)
    assert gaps[300] == pytest.approx(1 / 30)


def test_ramp_down_and_flat() -> None:
    down = list(LinearRamp(30, 10, 10).times(300))
    assert down == sorted(down)
    assert down[200] == pytest.approx(10.0, abs=0.01)
    flat = list(LinearRamp(5, 5, 2).times(12))
    assert flat[10] == pytest.approx(2.0)


def test_steps() -> None:
    times = list(Steps(((2, 2), (0, 3), (10, 1))).times(10))
    assert times[:4] == [0.0, 0.5, 1.0, 1.5]  # 2/s for 2 s
    assert times[4] == pytest.approx(5.0)  # then nothing for 3 s, then 10/s
    assert times[5] == pytest.approx(5.1)
    assert times == sorted(times)


def test_rate_function() -> None:
    times = list(RateFunction(lambda t: 10.0 if t < 1 else 100.0).times(20))
    assert times == sorted(times)
    assert times[9] < 1.0 <= times[10]
    assert times[19] - times[10] == pytest.approx(0.09, abs=0.02)
    with pytest.raises(ConfigurationError, match="returned"):
        list(RateFunction(lambda t: -1.0).times(2))


@pytest.mark.parametrize(
    ("spec", "first"),
    [("10..200/30s", LinearRamp(10, 200, 30)), ("0..50/5", LinearRamp(0, 50, 5)), ("20:10s,50:10,100", None),
     ("10..20/2m", LinearRamp(10, 20, 120)), ("1..2/0.5h", LinearRamp(1, 2, 1800))],
)  # fmt: skip
def test_parse_ramp(spec: str, first: object) -> None:
    schedule = parse_ramp(spec)
    if first is not None:
        assert schedule == first
    else:
        assert schedule == Steps(((20, 10), (50, 10), (100, 1)))


@pytest.mark.parametrize(
    "spec",
    ["", "fast", "10..20", "10..x/5", "20:0,5", "20,50", "5..0/3", "0:5", "1..2/3d", "1..2/m", "1..2/-1h"],
)  # fmt: skip
def test_parse_ramp_rejects(spec: str) -> None:
    with pytest.raises(ConfigurationError, match="--ramp"):
        parse_ramp(spec)


def test_plan_checks_and_names() -> None:
    plan = LoadPlan(guests=12345, meeting_urls=["https://m/x"], origin="https://o", display_name="G {n}")
    assert plan.guest_id(7) == "guest-00007"
    assert plan.name(7) == "G 7"
    with pytest.raises(ConfigurationError):
        LoadPlan(guests=1, meeting_urls=[], origin="https://o")
    with pytest.raises(ConfigurationError):
        LoadPlan(guests=1, meeting_urls=["https://m"], origin="https://o", concurrency=0)
    assert pool_size(200) == 250
    assert pool_size(1) == 16
