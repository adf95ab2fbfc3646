"""edgekd: distill a small student from a large teacher, prune, quantize, export, and measure it honestly."""

__version__ = "0.1.0"
