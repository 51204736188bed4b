"""Online calibration of an instance's step-time multiplier."""

from __future__ import annotations

import pytest

from blockproxy.calibration import SpeedCalibration


def test_learns_a_slower_instance():
    cal = SpeedCalibration()
    speed = 1.0
    for _ in range(60):
        # The instance is 1.5x slower than the profile: observed = 1.5 x the unit-speed time.
        speed = cal.observe(speed, predicted_tpot=0.010 * speed, observed_tpot=0.015)
    assert speed == pytest.approx(1.5, rel=0.01)
    assert cal.samples == 60


def test_starts_from_the_configured_speed_and_stays_within_range():
    cal = SpeedCalibration(initial=20.0)
    assert cal.speed == pytest.approx(20.0)
    for _ in range(200):
        cal.observe(cal.speed, predicted_tpot=0.001, observed_tpot=1e6)
    assert cal.speed == pytest.approx(200.0)


def test_ignores_useless_observations_and_can_be_disabled():
    cal = SpeedCalibration()
    assert cal.observe(1.0, predicted_tpot=0.0, observed_tpot=0.01) == 1.0
    assert cal.observe(1.0, predicted_tpot=float("inf"), observed_tpot=0.01) == 1.0
    off = SpeedCalibration(enabled=False)
    assert off.observe(1.0, 0.01, 0.05) == 1.0 and off.samples == 0
