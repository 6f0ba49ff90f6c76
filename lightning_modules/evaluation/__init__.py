"""Evaluation a clinician-facing team can trust: bootstrap intervals, calibration, plots, heat maps, reports."""
