"""Benchmarks: each prints a table. Run from the repository root: ``python -m bench.cpu``, ``python -m bench.gpu``,
``python -m bench.parallel``; ``bench.stepbench`` is the CFG-step machinery the first two share."""
