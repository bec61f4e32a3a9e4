"""Training apart from measuring: the flat-minimum optimizers, the trainer, its trajectory tracking, data
parallelism and the paper recipes."""
