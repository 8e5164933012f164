"""Shared fixtures: tiny random checkpoints in both layouts (same seed, same weights) and keyframes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segue.testing import make_tiny_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def official_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "official", layout="official", seed=0)


@pytest.fixture(scope="session")
def diffusers_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "diffusers", layout="diffusers", seed=0)


@pytest.fixture(scope="session")
def i2v_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "i2v", layout="official", model="tiny-i2v")


def _frame(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 7.0)], -1) * 255
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("frames")
    _frame(80, 64, 1).save(d / "first.png")
    _frame(80, 64, 2).save(d / "last.png")
    _frame(48, 96, 3).save(d / "tall.png")
    return d


TINY_RECIPE = Path(__file__).parent / "data" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle the tiny recipe's first stage trains from scratch (seconds; barely trained)."""
    from segue.train.recipe import load_recipe
    from segue.train.scratch import train_scratch

    return train_scratch(load_recipe(TINY_RECIPE), tmp_path_factory.mktemp("tiny-base"))
