"""FSDP2 sharding on 2 and 4 gloo processes (CPU, fp32 and bf16/fp32 mixed): same outputs, 1/world bytes.

One process group per world size runs every sub-case; each worker saves the unsharded and sharded
results of its sub-cases, the parent compares them.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from segue.config import REGISTRY
from segue.testing import join_workers, rendezvous_env, start_workers
from segue.tokenizer import save_tiny_tokenizer

CFG = REGISTRY["tiny-flf2v"]
PROMPTS = ["A cat walks across the road, the sky turns orange.", "", "a dog " * 9]
TIMEOUT_S = 80


def _dit_inputs(seed: int):
    cfg = CFG.dit
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, 3, 8, 8, generator=g)
    y = torch.randn(1, cfg.in_dim - cfg.out_dim, 3, 8, 8, generator=g)
    context = torch.randn(1, 7, cfg.text_dim, generator=g)
    clip = torch.randn(1, cfg.image_pos_len, cfg.image_dim, generator=g)
    return x, torch.tensor([999 - 100 * seed]), context, clip, y


def _dit_case(state, dtype: torch.dtype) -> dict:
    """Unsharded then sharded forwards of the same random DiT, two inputs each."""
    from segue.models.dit import WanDiT, apply_dtype_policy
    from segue.parallel.fsdp import full_param_bytes, local_param_bytes, shard_dit
    from segue.testing import randomize_

    torch.manual_seed(0)
    dit = apply_dtype_policy(randomize_(WanDiT(CFG.dit), seed=1).eval(), dtype)
    inputs = [_dit_inputs(s) for s in (1, 2)]
    with torch.no_grad():
        ref = [dit(*a) for a in inputs]
    full = full_param_bytes(dit)
    dtypes = {str(p.dtype) for p in dit.parameters()}
    shard_dit(dit, state)
    with torch.no_grad():
        out = [dit(*a) for a in inputs]
    from torch.distributed.tensor import DTensor

    return {
        "ref": ref,
        "out": out,
        "full_bytes": full,
        "local_bytes": local_param_bytes(dit),
        "dtypes": dtypes,
        "all_dtensor": all(isinstance(p, DTensor) for p in dit.parameters()),
        "out_dtypes": {str(p.dtype) for p in dit.parameters()},
        "requires_grad": any(p.requires_grad for p in dit.parameters()),
    }


def _meta_load_case(state) -> dict:
    """Built on meta, sharded, then filled from a full state dict: same as the loaded model."""
    from segue.models.dit import WanDiT, apply_dtype_policy
    from segue.parallel.fsdp import load_sharded_, local_param_bytes, shard_dit
    from segue.testing import randomize_

    dit = apply_dtype_policy(randomize_(WanDiT(CFG.dit), seed=5).eval(), torch.bfloat16)
    sd = dit.state_dict()
    inputs = _dit_inputs(3)
    with torch.no_grad():
        ref = dit(*inputs)
    with torch.device("meta"):
        meta = apply_dtype_policy(WanDiT(CFG.dit), torch.bfloat16)
    shard_dit(meta, state)
    load_sharded_(meta, sd, state.device, "DiT")
    with torch.no_grad():
        out = meta(*inputs)
    return {"ref": ref, "out": out, "local_bytes": local_param_bytes(meta)}


def _sp_case(state, sp_first: bool) -> dict:
    """FSDP together with sequence parallel (either order) matches the plain unsharded model."""
    from segue.models.dit import WanDiT
    from segue.parallel.fsdp import shard_dit
    from segue.parallel.sequence import apply_sequence_parallel
    from segue.testing import randomize_

    dit = randomize_(WanDiT(CFG.dit), seed=7).eval()
    inputs = [_dit_inputs(s) for s in (4, 5)]
    with torch.no_grad():
        ref = [dit(*a) for a in inputs]
    if sp_first:
        apply_sequence_parallel(dit, state)
    shard_dit(dit, state)
    if not sp_first:
        apply_sequence_parallel(dit, state)
    with torch.no_grad():
        out = [dit(*a) for a in inputs]
    return {"ref": ref, "out": out}


def _text_case(state, tok_dir: str) -> dict:
    from segue.models.encoders import TextEncoder
    from segue.parallel.fsdp import full_param_bytes, local_param_bytes, shard_text_encoder
    from segue.testing import randomize_
    from segue.tokenizer import load_tokenizer

    torch.manual_seed(0)
    enc = TextEncoder(CFG.text, load_tokenizer(Path(tok_dir)))
    randomize_(enc.model, seed=3)
    ref = enc.encode(PROMPTS)
    full = full_param_bytes(enc.model)
    shard_text_encoder(enc, state)
    m = enc.model
    out = [enc.encode(PROMPTS), enc.encode(PROMPTS[:1])]
    return {
        "ref": ref,
        "out": out,
        "full_bytes": full,
        "local_bytes": local_param_bytes(m),
        "tied": m.shared is m.encoder.embed_tokens,
        "n_params": len(list(m.parameters())),
    }


def _worker(rank: int, world: int, port: int, out_dir: str, tok_dir: str) -> None:
    rendezvous_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from segue.parallel import ParallelConfig, init_parallel

    result: dict = {}
    try:
        # the tiny DiT has 2 heads: Ulysses 2, and ring for the rest of the sequence split
        state = init_parallel(ParallelConfig(ulysses=2, ring=world // 2), device="cpu")
        result["fp32"] = _dit_case(state, torch.float32)
        result["mixed"] = _dit_case(state, torch.bfloat16)
        result["meta"] = _meta_load_case(state)
        result["text"] = _text_case(state, tok_dir)
        result["sp_then_fsdp"] = _sp_case(state, sp_first=True)
        result["fsdp_then_sp"] = _sp_case(state, sp_first=False)
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if dist.is_initialized():
        if "error" not in result:  # no rank tears gloo down while another still uses it (a rare SIGABRT)
            dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    world = request.param
    out = tmp_path_factory.mktemp(f"fsdp{world}")
    tok = out / "tok"
    save_tiny_tokenizer(tok, CFG.text.vocab_size)
    procs = start_workers(_worker, world, str(out), str(tok))
    alive = join_workers(procs, TIMEOUT_S)
    assert not alive, f"{len(alive)} worker(s) hung past {TIMEOUT_S}s"
    res = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    errors = [r["error"] for r in res if "error" in r]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return res


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def test_dit_fp32_matches_unsharded(results: list[dict]) -> None:
    world = len(results)
    for r in results:
        c = r["fp32"]
        assert c["all_dtensor"]
        assert _max_diff(c["out"], c["ref"]) < 1e-5  # both forwards: regather after reshard works
        assert c["ref"][0].shape == (1, CFG.dit.out_dim, 3, 8, 8)
        # exactly 1/world: every tiny parameter has a dim that 2 and 4 divide (no padding)
        assert c["local_bytes"] * world == c["full_bytes"]
    # the ranks agree with each other
    assert _max_diff(results[0]["fp32"]["out"], results[-1]["fp32"]["out"]) == 0


def test_dit_mixed_dtype_matches_unsharded(results: list[dict]) -> None:
    world = len(results)
    for r in results:
        c = r["mixed"]
        assert c["dtypes"] == {"torch.bfloat16", "torch.float32"}
        assert c["out_dtypes"] == c["dtypes"]  # FSDP kept each parameter's dtype
        # the byte-wise gather is exact: the sharded model computes the same bits
        assert _max_diff(c["out"], c["ref"]) == 0
        assert c["local_bytes"] * world == c["full_bytes"]
        assert not c["requires_grad"]


def test_dit_meta_build_sharded_load(results: list[dict]) -> None:
    world = len(results)
    for r in results:
        c = r["meta"]
        assert _max_diff([c["out"]], [c["ref"]]) == 0
        assert c["local_bytes"] == r["mixed"]["local_bytes"]
    assert world > 1


def test_text_encoder_matches_unsharded(results: list[dict]) -> None:
    world = len(results)
    for r in results:
        c = r["text"]
        assert c["tied"]
        assert _max_diff(c["out"][0], c["ref"]) < 1e-5
        assert _max_diff(c["out"][1], c["ref"][:1]) < 1e-5
        assert [t.shape for t in c["out"][0]] == [t.shape for t in c["ref"]]
        assert c["local_bytes"] * world == c["full_bytes"]


@pytest.mark.parametrize("order", ["sp_then_fsdp", "fsdp_then_sp"])
def test_composes_with_sequence_parallel(results: list[dict], order: str) -> None:
    for r in results:
        assert _max_diff(r[order]["out"], r[order]["ref"]) < 1e-5


def test_single_process_places_and_loads() -> None:
    """World 1: nothing is sharded; a CPU model is placed, a meta model is filled by load_sharded_."""
    from segue.errors import CheckpointError
    from segue.models.dit import WanDiT
    from segue.parallel import ParallelConfig, ParallelState
    from segue.parallel.fsdp import full_param_bytes, load_sharded_, local_param_bytes, shard_dit
    from segue.testing import randomize_

    state = ParallelState(ParallelConfig(), 0, 1, torch.device("cpu"), 0, 0, 0)
    dit = randomize_(WanDiT(CFG.dit), seed=1)
    assert shard_dit(dit, state) is dit and not any(p.requires_grad for p in dit.parameters())
    assert local_param_bytes(dit) == full_param_bytes(dit)
    with torch.device("meta"):
        meta = shard_dit(WanDiT(CFG.dit), state)
    load_sharded_(meta, dit.state_dict(), "cpu", "DiT")
    inputs = _dit_inputs(1)
    with torch.no_grad():
        assert torch.equal(meta(*inputs), dit(*inputs))
    sd = dit.state_dict()
    sd.pop("head.modulation")
    with torch.device("meta"):
        meta = WanDiT(CFG.dit)
    with pytest.raises(CheckpointError, match="missing 1 tensor.*head.modulation"):
        load_sharded_(meta, sd, "cpu", "DiT")
