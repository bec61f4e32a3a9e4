"""Perturbation and sharpness estimators: expected loss under weight noise and the sharpness curve, Keskar's
ε-sharpness, worst-case, m- and average-case sharpness, critical sharpness and PAC-Bayes flatness."""
