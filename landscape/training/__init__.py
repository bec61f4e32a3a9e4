"""Training apart from measuring: the flat-minimum optimizers, the trainer, its trajectory tracking, data
parallelism, the paper recipes, and callbacks that track curvature inside a HuggingFace Trainer or Lightning run."""
