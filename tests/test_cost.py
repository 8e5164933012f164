"""The cost model reproduces SPEC section 7's figures for the 14B model."""

from __future__ import annotations

import pytest

from segue.config import get_config
from segue.parallel import cost

C14 = get_config("flf2v-14b")


def test_tokens_and_flops_match_spec():
    assert cost.tokens(C14, 81, 720, 1280) == 75_600
    assert cost.tokens(C14, 81, 480, 832) == 32_760
    f = cost.dit_flops(C14, 75_600)
    assert f["linear"] == pytest.approx(1.8e15, rel=0.01)
    assert f["attention"] == pytest.approx(4.7e15, rel=0.01)
    assert 2 * f["total"] * 50 == pytest.approx(6.5e17, rel=0.01)  # CFG, 50 steps


def test_memory_and_communication_scale_with_the_layout():
    counts = cost.param_counts(C14)
    assert counts["dit"] == 16_395_536_704 and counts["vae"] == 126_892_531
    one = cost.memory_per_gpu(C14, 75_600, cost.Layout(1))
    assert one["dit"] == 2 * counts["dit"]  # bf16
    eight = cost.memory_per_gpu(C14, 75_600, cost.Layout(8, ulysses=8, fsdp=True))
    assert eight["dit"] < one["dit"] / 8 + 2 * 2 * cost.block_params(C14) + 1
    assert eight["activations"] == pytest.approx(one["activations"] / 8, rel=1e-3)
    comm = cost.comm_per_step(C14, 75_600, cost.Layout(8, ulysses=8))
    per_layer = cost.ulysses_layer_volume(C14, 75_600, 8)
    assert comm["ulysses"] == pytest.approx(2 * 40 * per_layer)
    assert cost.comm_per_step(C14, 75_600, cost.Layout(1))["total"] == 0
