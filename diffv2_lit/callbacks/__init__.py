"""Lightning callbacks: gradient-spike detection and the DIFF monitor (λ, context RMS, sinks, outliers)."""

from diffv2_lit.callbacks.diff_monitor import DiffMonitor
from diffv2_lit.callbacks.spike import GradientSpikeDetector

__all__ = ["DiffMonitor", "GradientSpikeDetector"]
