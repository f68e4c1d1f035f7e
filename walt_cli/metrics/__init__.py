"""Evaluation metrics: Fréchet maths, the I3D and Inception detectors, FVD and FID."""
