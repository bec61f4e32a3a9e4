"""The paper-figure experiments: the demo, every figure, the paper's recipes, method comparisons, noise sweeps, edge of stability."""
