"""The reusable core: models, LoRA, sampling, training, checkpoints, parallelism. It knows nothing of a study."""
