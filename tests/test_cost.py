import math

import pytest

from mpe import cost


def test_step_times_rows_are_consistent():
    rows = cost.step_times(["small_mlp"], [4, 16], "cpu", steps=2)
    assert [(r["model"], r["batch_size"]) for r in rows] == [("small_mlp", 4), ("small_mlp", 16)]
    for r in rows:
        assert 0 < r["s_per_step"] < 60 and r["params"] == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
        assert r["examples_per_s"] == pytest.approx(r["batch_size"] / r["s_per_step"])
        assert r["epochs_per_hour_60k"] == pytest.approx(3600 / (math.ceil(60000 / r["batch_size"]) * r["s_per_step"]))


def test_every_model_has_an_input_shape_and_bad_requests_fail():
    from mpe.models import MODELS

    assert set(cost.MODEL_INPUTS) <= set(MODELS)
    with pytest.raises(ValueError, match="no input shape"):
        cost.step_time("alexnet", 8)
    with pytest.raises(ValueError, match="positive"):
        cost.step_time("small_mlp", 0)


def test_peak_memory_sees_what_a_block_holds_and_not_what_it_does_not():
    import time

    import torch

    with cost.peak_memory() as held:
        x = torch.ones(50_000_000)  # 200 MB, held for 20 samples
        time.sleep(0.1)
        del x
    with cost.peak_memory() as idle:
        time.sleep(0.1)
    assert held.bytes > 150e6 and idle.bytes < 20e6, (held.bytes, idle.bytes)
