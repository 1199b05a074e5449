"""Calibration: datasets, INT8 calibration feeds, exit-threshold calibration, evaluation curves."""
