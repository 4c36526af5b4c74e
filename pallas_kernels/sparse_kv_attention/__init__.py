"""Block-sparse KV attention (api: `sparse_kv_attention`; spec: `reference.py`; Pallas kernel:
`kernel.py`)."""

from pallas_kernels.sparse_kv_attention.api import sparse_kv_attention

__all__ = ["sparse_kv_attention"]
