"""Curvature estimators: Lanczos eigenvalues and spectral density, trace estimators, per-layer curvature, and the
edge-of-stability runs."""
