"""vibee: LLM inference optimizations written as specs, compiled into tested torch/Triton modules."""

__version__ = "0.1.0"
