"""Arrays and kernels: ``attention()`` dispatch, the reference and xla paths, Pallas kernels.

Import the entry points from ``scoremod`` (``scoremod.attention``,
``scoremod.as_attention_fn``); the modules here are imported on demand so that the
Pallas kernels load only when used.
"""
