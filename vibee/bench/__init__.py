"""Benchmarks: `vibee bench throughput` (the offline engine) and `vibee bench serve` (HTTP load
against a running server), both writing JSON + markdown results under results/bench/."""
