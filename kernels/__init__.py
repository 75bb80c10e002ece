"""Compute kernels: torch references (CPU) and, later, Triton versions (CUDA).

Callers import ops from `kernels.ops`, which dispatches to the right backend.
"""
