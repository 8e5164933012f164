"""Deepening a DiT with identity blocks: the same function before training, a trainable block after."""

from __future__ import annotations

import pytest
import torch

from segue.config import REGISTRY
from segue.models.dit import WanDiT
from segue.testing import randomize_
from segue.train.grow import BRANCH_OUTPUTS, insert_identity_blocks

CFG = REGISTRY["tiny-flf2v"].dit  # 2 blocks


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "x": torch.randn(2, 16, 3, 6, 8, generator=g),
        "t": torch.tensor([640, 120]),
        "context": torch.randn(2, 7, CFG.text_dim, generator=g),
        "clip": torch.randn(4, 257, CFG.image_dim, generator=g),
        "y": torch.randn(2, 20, 3, 6, 8, generator=g),
    }


@pytest.fixture(scope="module")
def source() -> WanDiT:
    return randomize_(WanDiT(CFG), seed=1).eval()


@pytest.mark.parametrize("after", [(0,), (1,), (0, 1)])
def test_inserted_blocks_leave_the_output_unchanged(source, after):
    cfg, state = insert_identity_blocks(CFG, source.state_dict(), after)
    assert cfg.num_layers == CFG.num_layers + len(after)
    grown = WanDiT(cfg).eval()
    grown.load_state_dict(state)  # strict: every key of the deeper model is there, nothing else
    inputs = _inputs()
    with torch.no_grad():
        assert torch.equal(grown(**inputs), source(**inputs))
    # the new block behind source block i is a copy of it with its branch outputs at zero
    i = after[0]
    new, old = dict(grown.blocks[i + 1].named_parameters()), dict(source.blocks[i].named_parameters())
    for name, p in new.items():
        expected = torch.zeros_like(old[name]) if name.startswith(BRANCH_OUTPUTS) else old[name]
        assert torch.equal(p, expected), name
    assert sum(name.startswith(BRANCH_OUTPUTS) for name in new) == 6  # three linears, weight and bias each
    # every source block j sits behind the blocks inserted before it
    for j, block in enumerate(source.blocks):
        moved = grown.blocks[j + sum(i < j for i in after)]
        assert all(torch.equal(p, q) for p, q in zip(moved.parameters(), block.parameters())), j


def test_a_training_step_reaches_the_new_block(source):
    cfg, state = insert_identity_blocks(CFG, source.state_dict(), (0,))
    grown = WanDiT(cfg)
    grown.load_state_dict(state)
    grown(**_inputs()).square().mean().backward()
    new = grown.blocks[1]
    for layer in (new.self_attn.o, new.cross_attn.o, new.ffn[2]):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    # through a zero output layer nothing reaches the branch's inside yet
    assert new.self_attn.q.weight.grad.abs().sum() == 0


def test_bad_insertions_are_clear_errors(source):
    with pytest.raises(ValueError, match=r"distinct increasing indices in 0\.\.1, got \[2\]"):
        insert_identity_blocks(CFG, source.state_dict(), (2,))
    with pytest.raises(ValueError, match=r"got \[1, 0\]"):
        insert_identity_blocks(CFG, source.state_dict(), (1, 0))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"state dict has blocks \[0\], config says 2 layers"):
        insert_identity_blocks(CFG, state, (0,))
