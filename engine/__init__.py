"""trifuse engine: transformer models built on trifuse's fused kernels."""

__version__ = "0.1.0"
