"""The Objective (loss, gradient and Hessian-vector products over a fixed measurement set), built from a checkpoint
by `from_checkpoint`, and the curvature operators on it (Hessian, generalized Gauss-Newton, empirical Fisher); with
the plumbing they share: memory plan, parameter selection, probes, noise, BN recalibration, ranks, progress."""
