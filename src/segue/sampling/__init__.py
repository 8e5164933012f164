"""Flow-matching solvers and sampling helpers."""
