"""`parclip scan`: is a checkpoint backdoored, toward what, and did cleaning work, without knowing the trigger.

Three parts (docs/scan.md): a sweep of the trigger library against matched controls (:mod:`.sweep`,
:mod:`.controls`), trigger inversion at the encoder and the classifier level (:mod:`.invert`), and a verdict with
calibrated thresholds (:mod:`.verdict`); :mod:`.run` runs them, :mod:`.report` writes the results.
"""
from .run import MIN_IMAGES, ScanConfig, ScanError, scan
from .report import write_scan
from .verdict import THRESHOLDS, decide

__all__ = ["scan", "ScanConfig", "ScanError", "MIN_IMAGES", "write_scan", "THRESHOLDS", "decide"]
