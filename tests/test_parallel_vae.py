"""Spatially parallel VAE decoding on 2 and 4 gloo processes equals the single-process decode."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

from segue.config import REGISTRY
from segue.errors import InputError
from segue.models.vae import WanVAE
from segue.parallel.vae import COMM, spatial_parallel, split_rows
from segue.testing import join_workers, randomize_, rendezvous_env, start_workers

TINY = REGISTRY["tiny-flf2v"].vae
# (batch, h, w): even over 2 ranks, uneven over 2 and 4 (4 ranks on 5 rows: bands of 2, 1, 1, 1)
SIZES = [(1, 6, 8), (1, 5, 8), (2, 7, 6)]
TIMEOUT_S = 90


def make_vae() -> WanVAE:
    torch.manual_seed(0)
    return randomize_(WanVAE(TINY), seed=7).eval()


def make_latent(b: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * h + w)
    return torch.randn(b, TINY.z_dim, 3, h, w, generator=g)


def n_patched(vae: WanVAE) -> int:
    return sum("forward" in m.__dict__ for m in vae.modules())


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from segue.parallel.vae import parallel_decode

    rendezvous_env(rank, world, port)
    torch.set_num_threads(1)
    res: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        vae = make_vae()
        with torch.no_grad():
            for b, h, w in SIZES:
                z = make_latent(b, h, w)
                calls: list[tuple[int, int]] = []
                COMM.reset()
                res[(h, w, "all")] = parallel_decode(vae, z, None, progress=lambda i, n, c=calls: c.append((i, n)))
                res[(h, w, "bytes")] = COMM.bytes
                res[(h, w, "progress")] = calls
                res[(h, w, "noclamp")] = parallel_decode(vae, z, None, clamp=False)
                res[(h, w, "dst0")] = parallel_decode(vae, z, dist.group.WORLD, dst=0)
            # a subgroup (halves of the world), dst counted within it: its second rank gets the video
            if world >= 4:
                halves = [dist.new_group(list(r)) for r in (range(world // 2), range(world // 2, world))]
                sub = halves[rank // (world // 2)]
                res["sub_dst1"] = parallel_decode(vae, make_latent(*SIZES[0]), sub, dst=1)
            try:
                parallel_decode(vae, make_latent(1, world - 1, 8), None)
            except InputError as e:
                res["error"] = str(e)
            # forwards are restored on exit, also when the body raises
            res["patched_inside"] = 0
            try:
                with spatial_parallel(vae, None, split_rows(6, world)):
                    res["patched_inside"] = n_patched(vae)
                    raise KeyError("boom")
            except KeyError:
                pass
            res["patched_after"] = n_patched(vae)
            res["plain"] = vae.decode(make_latent(*SIZES[-1]))  # a normal decode after the context
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        res = {"traceback": traceback.format_exc()}
    torch.save(res, Path(out) / f"rank{rank}.pt")


def run_ranks(world: int, tmp: Path) -> list[dict]:
    procs = start_workers(_worker, world, str(tmp))
    alive = join_workers(procs, TIMEOUT_S)
    assert not alive, f"{len(alive)} of {world} workers hung"
    results = []
    for r in range(world):
        path = tmp / f"rank{r}.pt"
        assert path.exists(), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        res = torch.load(path, weights_only=True)
        assert "traceback" not in res, f"rank {r} failed:\n{res.get('traceback')}"
        results.append(res)
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    vae = make_vae()
    ref = {}
    with torch.no_grad():
        for b, h, w in SIZES:
            z = make_latent(b, h, w)
            ref[(h, w, "all")] = vae.decode(z)
            ref[(h, w, "noclamp")] = vae.decode(z, clamp=False)
    return ref


def test_split_rows() -> None:
    assert split_rows(6, 2) == [3, 3]
    assert split_rows(7, 2) == [4, 3]
    assert split_rows(5, 4) == [2, 1, 1, 1]
    with pytest.raises(InputError, match="latent height 3 .* 4 ranks"):
        split_rows(3, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_decode_matches_single_process(world: int, reference: dict, tmp_path: Path) -> None:
    results = run_ranks(world, tmp_path)
    for rank, res in enumerate(results):
        for _, h, w in SIZES:
            for kind in ("all", "noclamp"):
                ref, got = reference[(h, w, kind)], res[(h, w, kind)]
                assert got.shape == ref.shape, (rank, h, w, kind)
                diff = (got - ref).abs().max().item()
                assert diff < 1e-5, f"rank {rank} {h}x{w} {kind}: max abs diff {diff:.3g}"
            if rank == 0:
                diff = (res[(h, w, "dst0")] - reference[(h, w, "all")]).abs().max().item()
                assert diff < 1e-5, f"dst=0 {h}x{w}: max abs diff {diff:.3g}"
            else:
                assert res[(h, w, "dst0")] is None
            assert res[(h, w, "progress")] == [(1, 3), (2, 3), (3, 3)]
            assert res[(h, w, "bytes")] > 0
        # unclamped values leave [-1, 1] with these weights, so the clamp=False case tests something
        assert reference[(SIZES[0][1], SIZES[0][2], "noclamp")].abs().max() > 1
        _, h, w = SIZES[0]
        if world > 2:
            if rank % (world // 2) == 1:
                assert (res["sub_dst1"] - reference[(h, w, "all")]).abs().max() < 1e-5
            else:
                assert res["sub_dst1"] is None
        assert f"latent height {world - 1}" in res["error"] and f"{world} ranks" in res["error"]
        assert res["patched_inside"] > 0 and res["patched_after"] == 0
        b, h, w = SIZES[-1]
        # 1 thread here, 2 in the parent: equal up to summation order
        assert (res["plain"] - reference[(h, w, "all")]).abs().max() < 1e-5
