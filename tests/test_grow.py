"""Growing trained models: a DiT deepened by identity blocks, a VAE decoder widened by zero channels; the
same function before training, trainable new parts after."""

from __future__ import annotations

import pytest
import torch

from segue.config import REGISTRY
from segue.models.dit import WanDiT
from segue.models.vae import WanVAE
from segue.testing import randomize_
from segue.train.grow import BRANCH_OUTPUTS, insert_identity_blocks, widen_decoder

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


def _vae_cfg():
    from segue.train.recipe import load_recipe

    return load_recipe("default").model.config().vae  # base width 16, 4x time and space


def test_a_widened_decoder_decodes_what_the_narrow_one_did():
    cfg = _vae_cfg()
    narrow = randomize_(WanVAE(cfg), seed=2).eval()
    wide_cfg, state = widen_decoder(cfg, narrow.state_dict(), 24)
    assert wide_cfg.decoder_dim == 24 and wide_cfg.dim == cfg.dim and wide_cfg.decoder_width == 24
    wide = WanVAE(wide_cfg).eval()
    wide.load_state_dict(state)  # strict: every key of the wider decoder is there
    assert wide.decoder.conv1.weight.shape[0] == 24 * cfg.dim_mult[-1]
    for k, v in narrow.state_dict().items():  # the encoder (so the latent space) is untouched
        if not k.startswith("decoder."):
            assert torch.equal(state[k], v), k
    z = torch.randn(1, cfg.z_dim, 3, 6, 5, generator=torch.Generator().manual_seed(4))
    video = torch.rand(1, 3, 9, 24, 20, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        a, b = narrow.decode(z, clamp=False), wide.decode(z, clamp=False)
        assert torch.equal(narrow.encode(video), wide.encode(video))
    assert a.shape == b.shape == (1, 3, 9, 24, 20)
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    # the same width again is the same state
    same_cfg, same = widen_decoder(cfg, narrow.state_dict(), cfg.dim)
    assert same_cfg == cfg and all(torch.equal(same[k], v) for k, v in narrow.state_dict().items())


def test_a_training_step_reaches_the_new_decoder_channels():
    cfg = _vae_cfg()
    narrow = randomize_(WanVAE(cfg), seed=2)
    wide_cfg, state = widen_decoder(cfg, narrow.state_dict(), 24)
    wide = WanVAE(wide_cfg)
    wide.load_state_dict(state)
    z = torch.randn(1, cfg.z_dim, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    wide.decode(z, clamp=False).square().mean().backward()
    d = wide.decoder
    new = slice(16 * 4, 24 * 4)  # the widest stage's new channels
    for layer in (d.conv1, d.middle[0].residual[2], d.middle[2].residual[6]):
        assert layer.weight[new].abs().sum() == 0  # they start at zero ...
        assert layer.weight.grad[new].abs().sum() > 0, layer  # ... and learn at once
    v_new = slice(2 * 96 + 64, 3 * 96)  # the attention's new value channels (q, k, v of 96 each)
    assert d.middle[1].to_qkv.weight.grad[v_new].abs().sum() > 0
    # what reads a new channel learns once the channel is no longer zero: after one step
    assert d.head[2].weight.grad[:, 16:].abs().sum() == 0
    torch.optim.SGD(wide.decoder.parameters(), lr=0.1).step()
    wide.zero_grad()
    wide.decode(z, clamp=False).square().mean().backward()
    assert d.head[2].weight.grad[:, 16:].abs().sum() > 0  # the new full-size channels reach the pixels


def test_bad_widenings_are_clear_errors():
    cfg = _vae_cfg()
    state = WanVAE(cfg).state_dict()
    with pytest.raises(ValueError, match="decoder width 12 is below the current 16: widening only"):
        widen_decoder(cfg, state, 12)
    with pytest.raises(ValueError, match=r"VAE state dict keys do not fit .* missing \['decoder.head.2.bias'\]"):
        widen_decoder(cfg, {k: v for k, v in state.items() if k != "decoder.head.2.bias"}, 24)
