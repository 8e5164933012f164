"""bench.gpu's step machinery on CPU at a small size: every lossless option matches the plain path and
diffusers' transformer holds the same weights (what the GPU table's relative-error column relies on)."""

from __future__ import annotations

from bench import gpu


def test_small_step_table_on_cpu(capsys):
    gpu.main(["--small", "--device", "cpu", "--cases", "480p", "--dtype", "float32", "--iters", "1", "--warmup", "0",
              "--options", "plain,fused,cfg-batch,fp8,diffusers"])  # fmt: skip
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"plain", "fused", "cfg-batch", "fp8", "diffusers"} <= rows.keys()
    err = {k: float(v[7]) for k, v in rows.items() if k != "option"}
    assert err["plain"] == 0.0
    assert err["fused"] < 1e-5 and err["cfg-batch"] < 1e-5  # lossless within fp32 rounding
    assert err["diffusers"] < 1e-4  # same weights through diffusers' own arithmetic
    assert 1e-4 < err["fp8"] < 0.1  # lossy, measured, not broken
    assert rows["fp8"][2].strip() == "yes"


def test_no_gpu_rows_say_not_measured(capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    gpu.main(["--options", "plain,lossless,diffusers"])
    out = capsys.readouterr().out
    assert "No GPU here: not measured." in out
    assert out.count("| not measured |") == 6  # 3 options x 480p and 720p
    assert "75,600 tokens" in out and "32,760 tokens" in out  # the 14B sizes (SPEC section 7)
