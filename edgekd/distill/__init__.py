"""The distill stage: teacher (loaded or trained), scratch baseline, and KD student."""

from edgekd.distill.pipeline import run_distill

__all__ = ["run_distill"]
