"""Which captions a model follows, by path, and whether its circles take their sense from the text.

    python bench/caption_paths.py EVAL_JSON [EVAL_JSON ...]

Reads the ``eval.json`` files that ``segue eval`` writes. For each file it prints one markdown table row
(stdout): captions followed, by path. It also gives, for every loop group (a "clockwise" and a
"counterclockwise" caption on the same keyframes), how far the caption moves the video in the tracker's
terms. That is the mean absolute change of the three track distances between the two captions' videos, in
pixels. Near 0, the model makes the same video for both words; it follows the true tracks when the change is
about the distance between them (10-15 px at the default size).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def path_counts(summary: dict[str, Any]) -> tuple[Counter, Counter]:
    """(followed, asked) caption counts by path over an eval summary's ambiguous groups."""
    followed, asked = Counter(), Counter()
    for group in summary["groups"]:
        for r in group["results"]:
            asked[r["path"]] += 1
            followed[r["path"]] += bool(r["model_correct"])
    return followed, asked


def sense_changes(summary: dict[str, Any]) -> list[float]:
    """Per loop group: the mean |change| of the track distances between its clockwise and its counterclockwise
    video (px); nan where the tracker lost the object in either (an infinite distance)."""
    out = []
    for group in summary["groups"]:
        by_path = {r["path"]: r for r in group["results"]}
        if "circle_cw" not in by_path or "circle_ccw" not in by_path:
            continue
        a, b = (by_path[p]["model_distances"] for p in ("circle_cw", "circle_ccw"))
        d = [abs(float(x) - float(y)) for x, y in zip(a, b)]
        out.append(sum(d) / len(d) if all(math.isfinite(v) for v in d) else math.nan)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evals", nargs="+", type=Path, help="eval.json files written by segue eval")
    args = ap.parse_args(argv)
    rows = []
    for f in args.evals:
        try:
            summary = json.loads(f.read_text())
            counts = path_counts(summary), sense_changes(summary)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"caption_paths: {f}: not a segue eval.json ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        rows.append((f, *counts))
    paths = sorted({p for _, (_, asked), _ in rows for p in asked})
    print("| eval | followed | " + " | ".join(paths) + " | cw/ccw change per loop group (px) |")
    print("|---|---:|" + "---|" * len(paths) + "---|")
    for f, (followed, asked), changes in rows:
        cells = [f"{followed[p]}/{asked[p]}" if asked[p] else "" for p in paths]
        total = f"{sum(followed.values())}/{sum(asked.values())}"
        print(f"| {f} | {total} | " + " | ".join(cells) + " | " + " ".join(f"{c:.1f}" for c in changes) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
