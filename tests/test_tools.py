"""The measuring subcommands: ``segue sweep`` and ``segue calibrate-cache``."""

from __future__ import annotations

import json

from segue.cli import main


def test_sweep_prints_one_scored_row_per_setting(tiny_base, capsys):
    tiny_bundle = tiny_base
    args = ["sweep", "--ckpt", str(tiny_bundle), "--steps", "1,2", "--guidance", "2", "--guidance-steps", "all,1",
            "--clips", "1", "--groups", "1"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    settings = [r.split(" | ")[:4] for r in rows]
    assert settings == [["| 1", "2", "all", "3"], ["| 1", "2", "1", "3"], ["| 2", "2", "all", "3"],
                        ["| 2", "2", "1", "3"]]  # fmt: skip
    cells = [[float(x) for x in r.strip("| ").split(" | ")[4:]] for r in rows]
    assert all(len(c) == 6 and 0.0 <= c[3] <= 1.0 and 0.0 <= c[4] <= 1.0 for c in cells)  # SSIM, compliance
    # one step guided on a 1-step run is the run guided throughout: the same scores
    assert cells[0][:5] == cells[1][:5]
    assert "val split, 1 clips, 1 groups" in captured.out and "crossfade: in-between" in captured.out
    assert captured.err.count("[sweep]") == 4
    for bad, message in ((["--guidance-steps", "0"], "--guidance-steps takes 'all' or counts >= 1"),
                         (["--steps", "two"], "--steps: expected comma-separated ints, got 'two'"),
                         (["--clips", "0"], "--clips must be >= 1")):  # fmt: skip
        assert main(["sweep", "--ckpt", str(tiny_bundle), *bad]) == 2
        assert message in capsys.readouterr().err


def test_calibrate_cache_writes_a_calibration_generate_reads(tmp_path, capsys):
    out = tmp_path / "cal.json"
    args = ["calibrate-cache", "--tiny", "--steps", "4", "--frames", "5", "--teacache", "0.1", "--magcache", "0.1",
            "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = [r.split(" | ") for r in table.splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r[0] for r in rows] == ["| none", "| teacache", "| magcache"]
    assert rows[0][5] == "inf"  # the plain run is the calibration run, to the bit
    calibration = json.loads(out.read_text())
    assert calibration["records"] and f"calibration: {out}" in table
    assert main(["calibrate-cache", "--out", str(tmp_path / "x.json")]) == 2
    assert "--first (and usually --last) keyframes are required unless --tiny" in capsys.readouterr().err
    assert main(["calibrate-cache", "--tiny", "--teacache", "a,b"]) == 2
    assert "--teacache: expected comma-separated numbers" in capsys.readouterr().err
