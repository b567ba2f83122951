"""Drift monitoring: compare served predictions with the calibration split they were certified on."""

from roadwork.monitor.drift import DriftThresholds, compare_predictions, psi, reference_table

__all__ = ["DriftThresholds", "compare_predictions", "psi", "reference_table"]
