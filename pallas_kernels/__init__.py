"""Pallas kernels (tree attention, sparse-KV attention); filled by the kernels issue."""
