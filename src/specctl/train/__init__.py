"""Draft training: data (store/dir -> batches), TTT objective, parallelism, loop, checkpoints."""
