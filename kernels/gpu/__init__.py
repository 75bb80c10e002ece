"""Triton implementations of the ops in `kernels/`, one module per kernel family.

Importing anything here imports triton, so only `kernels.ops` imports these modules, and
only when the Triton backend is chosen. On CPU they run under `TRITON_INTERPRET=1` (tests).
"""
