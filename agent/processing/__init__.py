"""Vectorized pre- and post-processing (OpenCV and NumPy, no per-pixel Python)."""
