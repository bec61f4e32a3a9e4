"""Loss surfaces: directions (random filter-normalized, between checkpoints, PCA of a trajectory) and resumable
1-D/2-D surfaces in HDF5."""
