"""tune_landmarks: Ray Tune + Optuna sweeps for difficult-landmark fine-tuning of cephalometric models.

The data flows read -> cache -> augment -> heatmap -> model -> loss -> metrics -> run -> search ->
resume/export/report; each step is one module. This file only re-exports the public surface.
"""
import os

# albumentations phones home on import unless told not to; nothing here may touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
