"""Every Lightning callback of the project. They know the LightningModule only through the small protocol
in protocol.py (`model`, `model_config`, optionally `gradient_norm()` and `hparams["tokenizer"]`).

    GradientSpikeDetector  spike.py        the gradient norm (and loss) against its running level: log/skip/stop
    DiffMonitor            diff_monitor.py λ, context RMS, attention sinks and outliers per layer
    ThroughputMFU          throughput.py   tokens/s, MFU against a dense peak, peak memory
    SampleText             sample_text.py  a generated sample every N steps and at the end
    PreemptionCheckpoint   preemption.py   SIGTERM / SIGUSR1 / Ctrl-C -> a checkpoint at the step's end, stop
    RemoveEmptyRunFolder   cleanup.py      a run that failed before logging anything leaves no folder
    StepProgressBar        progress.py     one bar in optimizer steps: loss, tokens/s, ETA
"""

from diffv2_lit.callbacks.cleanup import RemoveEmptyRunFolder
from diffv2_lit.callbacks.diff_monitor import DiffMonitor
from diffv2_lit.callbacks.preemption import PreemptionCheckpoint
from diffv2_lit.callbacks.progress import StepProgressBar
from diffv2_lit.callbacks.sample_text import SampleText
from diffv2_lit.callbacks.spike import GradientSpikeDetector
from diffv2_lit.callbacks.throughput import ThroughputMFU

__all__ = ["DiffMonitor", "GradientSpikeDetector", "PreemptionCheckpoint", "RemoveEmptyRunFolder", "SampleText",
           "StepProgressBar", "ThroughputMFU"]
