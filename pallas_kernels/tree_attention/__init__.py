"""Tree attention (api: `tree_attention`; spec: `reference.py`; Pallas kernel: `kernel.py`)."""

from pallas_kernels.tree_attention.api import tree_attention

__all__ = ["tree_attention"]
