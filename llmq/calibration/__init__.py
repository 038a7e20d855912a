"""Calibration: the token windows a method calibrates on (`batches.py`) and the activations they produce at each
decoder block (`capture.py`). `llmq.calibration.calibration_batches` is public API (README, Use)."""

from .batches import calibration_batches
from .capture import BlockInputs, capture_inputs, linear_clusters

__all__ = ["BlockInputs", "calibration_batches", "capture_inputs", "linear_clusters"]
