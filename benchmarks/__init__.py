"""Benchmarks of sfron_ops: every backend against the stock-PyTorch composition and the official loop.

``python -m benchmarks.run`` measures every op on every case and writes JSON,
Markdown and a chart under ``benchmarks/results/``; ``pytest benchmarks`` runs
the same ops as pytest-benchmark microbenchmarks.
"""
