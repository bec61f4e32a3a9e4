"""Curvature estimators: Lanczos eigenvalues and spectral density, trace estimators, the diagonal, per-layer curvature,
and the edge-of-stability runs."""
