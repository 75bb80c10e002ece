"""Worker side of raylane: the inference engine, the trainer, and the Ray actors."""
