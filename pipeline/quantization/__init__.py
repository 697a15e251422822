"""Quantization: per-layer plans, the quantize methods (one module each) and simulated activations."""
from lpc.pipeline.quantization.registry import QUANTIZE_METHODS, QuantizeMethod, TuneInputs

# One import line per method module: importing registers it.
from lpc.pipeline.quantization import gptq  # noqa: E402,F401
from lpc.pipeline.quantization import distill  # noqa: E402,F401
from lpc.pipeline.quantization import tune  # noqa: E402,F401

__all__ = ["QUANTIZE_METHODS", "QuantizeMethod", "TuneInputs"]
