"""Pallas kernels: tree attention and block-sparse KV attention.

Each op is a folder with `api.py` (the entry point, dispatching auto | pallas | reference),
`reference.py` (pure jnp: the specification and the CPU path) and `kernel.py` (the Pallas
kernel; the GPU backend choice lives there). `common.py` holds what the ops share: input
validation, dispatch, block sizes, the online-softmax update and the log-sum-exp merge.
"""
