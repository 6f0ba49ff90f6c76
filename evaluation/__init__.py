"""Evaluation of a trained run: metrics with intervals, calibration, plots, heat maps and the report."""
