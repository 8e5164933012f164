"""Sequence parallel DiT (Ulysses, ring, USP) on 2 and 4 gloo processes vs the single-process forward."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from segue.config import DiTConfig
from segue.dist import ParallelConfig, ParallelState
from segue.errors import InputError
from segue.models.dit import WanDiT
from segue.parallel.sequence import apply_sequence_parallel, remove_sequence_parallel
from segue.testing import join_workers, randomize_, rendezvous_env, start_workers

# 4 heads (Ulysses 4 possible), head dim 12, an image branch so every block input is exercised.
CFG = DiTConfig(
    dim=48, ffn_dim=96, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=8, in_dim=16,
    out_dim=16, image_dim=24, image_pos_len=None,
)  # fmt: skip
# Latent (T, H, W) with patch (1, 2, 2): 45 tokens (uneven for 2 and 4), 16 (even), 1 (whole blocks of padding).
SIZES = {"uneven": (3, 6, 10), "even": (2, 4, 8), "one": (1, 2, 2)}
# (name, ParallelConfig kwargs, sizes) per world size.
CASES = {
    2: [
        ("ulysses2", {"ulysses": 2}, ("uneven", "even", "one")),
        ("ring2", {"ring": 2}, ("uneven", "even", "one")),
        ("ulysses2_ref", {"ulysses": 2, "reference_padding": True}, ("uneven", "even")),
        ("ring2_ref", {"ring": 2, "reference_padding": True}, ("uneven", "even")),
    ],
    4: [
        ("usp2x2", {"ulysses": 2, "ring": 2}, ("uneven", "even", "one")),
        ("ring4", {"ring": 4}, ("uneven", "even", "one")),
        ("ulysses4", {"ulysses": 4}, ("uneven", "even", "one")),
        ("cfg_ulysses2", {"ulysses": 2, "cfg": True}, ("uneven",)),
        ("usp2x2_ref", {"ulysses": 2, "ring": 2, "reference_padding": True}, ("uneven", "even")),
    ],
}
TOL = 1e-5


def make_model() -> WanDiT:
    torch.manual_seed(0)
    return randomize_(WanDiT(CFG), seed=1).eval()


def make_inputs(size: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    t, h, w = SIZES[size]
    return {
        "x": torch.randn(2, CFG.in_dim, t, h, w, generator=g),
        "t": torch.tensor([300.0, 850.0]),
        "context": torch.randn(2, 5, CFG.text_dim, generator=g),
        "clip": torch.randn(2, 3, CFG.image_dim, generator=g),
    }


def expected_bytes(kwargs: dict, size: str) -> dict[str, int]:
    """Bytes one rank sends per forward (fp32): per layer 4 all-to-alls of (U-1)/U of its [B, Lc, C]
    q/k/v/out and R-1 ring steps of its k and v; the final all-gather sends its chunk to sp-1 ranks."""
    u, r = kwargs.get("ulysses", 1), kwargs.get("ring", 1)
    t, h, w = SIZES[size]
    lc = -(-t * (h // 2) * (w // 2) // (u * r))
    chunk = 2 * lc * CFG.dim * 4
    sent = {
        "all_to_all": CFG.num_layers * 4 * (chunk * (u - 1) // u),
        "ring": CFG.num_layers * (r - 1) * 2 * chunk,
        "all_gather": chunk * (u * r - 1),
    }
    return {**sent, "total": sum(sent.values())}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    rendezvous_env(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from segue.dist import init_parallel
    from segue.parallel.sequence import comm_stats, reset_comm_stats

    try:
        model, results = make_model(), {}
        with torch.no_grad():
            results["baseline"] = model(**make_inputs("uneven"))  # same threads as "removed"
        for name, kwargs, sizes in CASES[world]:
            state = init_parallel(ParallelConfig(**kwargs), "cpu")
            apply_sequence_parallel(model, state)
            for size in sizes:
                reset_comm_stats()
                with torch.no_grad():
                    results[f"{name}/{size}"] = model(**make_inputs(size))
                results[f"{name}/{size}/bytes"] = comm_stats()
            remove_sequence_parallel(model)
        reset_comm_stats()
        with torch.no_grad():
            results["removed"] = model(**make_inputs("uneven"))
        results["removed/bytes"] = comm_stats()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _spawn(world: int, tmp: Path) -> list[dict]:
    procs = start_workers(_worker, world, str(tmp))
    join_workers(procs, timeout=120)
    errors = [f.read_text() for f in sorted(tmp.glob("*.err"))]
    assert not errors, "worker failed:\n" + "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    model = make_model()
    with torch.no_grad():
        return {size: model(**make_inputs(size)) for size in SIZES}


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_single_process(world: int, tmp_path: Path, reference: dict) -> None:
    results = _spawn(world, tmp_path)
    for name, kwargs, sizes in CASES[world]:
        for size in sizes:
            key, ref = f"{name}/{size}", reference[size]
            outs = [r[key] for r in results]
            for out in outs:
                assert out.shape == ref.shape == (2, 16, *SIZES[size])
                assert torch.equal(out, outs[0]), f"{key}: ranks disagree"
            err = (outs[0] - ref).abs().max().item()
            print(f"world {world} {key}: max abs diff {err:.2e}")
            if kwargs.get("reference_padding") and size == "uneven":
                assert err > 1e-3, f"{key}: unmasked padding should change the output, diff {err:.2e}"
            else:
                assert err < TOL, f"{key}: max abs diff {err:.2e}"
            assert results[0][f"{key}/bytes"] == expected_bytes(kwargs, size), key
    # Removed: the plain single-process forward again, bit for bit, and no communication.
    for r in results:
        assert torch.equal(r["removed"], r["baseline"])
        assert r["removed/bytes"]["total"] == 0


def test_num_heads_not_divisible_by_ulysses() -> None:
    model = make_model()
    state = ParallelState(ParallelConfig(ulysses=3), rank=0, world_size=3, device=torch.device("cpu"),
                          cfg_rank=0, ring_rank=0, ulysses_rank=0)  # fmt: skip
    with pytest.raises(InputError, match=r"num_heads 4 .*Ulysses degree 3"):
        apply_sequence_parallel(model, state)
    assert not model._forward_pre_hooks and not model.blocks[0]._forward_pre_hooks


def test_missing_groups_rejected() -> None:
    state = ParallelState(ParallelConfig(ring=2), rank=0, world_size=2, device=torch.device("cpu"),
                          cfg_rank=0, ring_rank=0, ulysses_rank=0)  # fmt: skip
    with pytest.raises(InputError, match="init_parallel"):
        apply_sequence_parallel(make_model(), state)
