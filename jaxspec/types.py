"""Shape legend and jaxtyping aliases used across jaxspec.

Letters (one meaning everywhere):
  B batch rows            S cache slots (max sequence length of the cache)
  T query tokens this forward (in-flight tokens: a prefill chunk, 1 for AR, N+1 for a tree)
  N tree nodes            D tree depth         C children per node (tree fan-out)
  H query heads           K KV heads            G = H / K query heads per KV head
  E head dim              M model width (hidden size)   F MLP width
  V vocabulary            L layers              P padded prompt length
"""

from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

__all__ = ["Array", "Bool", "Float", "Int", "PRNGKeyArray"]
