"""Online calibration of an instance's step-time multiplier from pure decode steps."""

from __future__ import annotations

import random

import pytest

from blockproxy.cluster.calibration import SpeedCalibration


def test_learns_a_slower_instance_despite_noise_and_outliers():
    rng = random.Random(1)
    cal = SpeedCalibration()
    for i in range(400):
        noise = rng.lognormvariate(0.0, 0.05)
        stall = 5.0 if i % 37 == 0 else 1.0  # an unseen prefill or a stall now and then
        cal.observe_step(observed_s=0.0075 * 1.5 * noise * stall, model_s=0.0075)
    assert cal.speed == pytest.approx(1.5, rel=0.03)


def test_needs_a_few_samples_before_changing_speed():
    cal = SpeedCalibration(min_samples=16, update_every=16)
    updates = [cal.observe_step(0.02, 0.01) for _ in range(15)]
    assert not any(updates) and cal.speed == 1.0
    assert cal.observe_step(0.02, 0.01) and cal.speed == pytest.approx(2.0)


def test_starts_from_the_configured_speed_and_stays_within_range():
    cal = SpeedCalibration(initial=20.0)
    assert cal.speed == 20.0
    for _ in range(64):
        cal.observe_step(observed_s=1e6, model_s=0.001)
    assert cal.speed == pytest.approx(200.0)


def test_ignores_useless_observations_and_can_be_disabled():
    cal = SpeedCalibration()
    assert not cal.observe_step(0.01, 0.0)
    assert not cal.observe_step(float("inf"), 0.01)
    assert not cal.observe_step(0.0001, 0.01)  # two events in one step
    assert cal.samples == 0
    off = SpeedCalibration(enabled=False)
    assert not off.observe_step(0.05, 0.01) and off.samples == 0
