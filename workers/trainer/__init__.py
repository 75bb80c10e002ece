"""Training for the `train` role: causal-LM fine-tuning (LoRA or full) of the models the engine serves.

Plain torch, no Ray: a train-pool actor builds a `Trainer` from a `TrainConfig` after setting up
`torch.distributed`, calls `step()` and streams its `StepMetrics`.
"""
