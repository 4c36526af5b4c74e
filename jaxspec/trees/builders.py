"""Small functions that build `TreeSpec`s, and the tree-file loader.

Every builder returns nodes in the canonical numbering of `jaxspec.trees.spec` (level by level,
children grouped by parent, siblings in rank order). Named trees live in `configs/trees/<name>.toml`
at the repository root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxspec.errors import ConfigError
from jaxspec.trees.spec import TreeSpec

TREES_DIR = Path(__file__).resolve().parents[2] / "configs" / "trees"


def chain(k: int) -> TreeSpec:
    """k speculated tokens in a line (plain draft-then-verify). `chain(0)` is the root only: AR."""
    if type(k) is not int or k < 0:
        raise ConfigError(f"chain length must be an int >= 0, got {k!r}")
    return TreeSpec((-1,) + tuple(range(k)))


def kary(width: int, depth: int) -> TreeSpec:
    """Complete `width`-ary tree of `depth` levels below the root, numbered in BFS order.

    Has `width + width**2 + ... + width**depth` speculated nodes; `kary(1, d) == chain(d)`.
    """
    for what, v, lo in (("width", width, 1), ("depth", depth, 0)):
        if type(v) is not int or v < lo:
            raise ConfigError(f"kary {what} must be an int >= {lo}, got {v!r}")
    parents = [-1]
    level = [0]  # node ids of the previous level, in order
    for _ in range(depth):
        nxt = []
        for p in level:  # each parent's children are contiguous, in rank order
            for _ in range(width):
                nxt.append(len(parents))
                parents.append(p)
        level = nxt
    return TreeSpec(tuple(parents))


def from_parents(parents: Iterable[int] | np.ndarray) -> TreeSpec:
    """A tree from a parent list/tuple/array that includes the root's -1 (`parents[0] == -1`)."""
    arr = np.asarray(list(parents) if not isinstance(parents, np.ndarray) else parents)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"tree parents must be a 1-D sequence of ints, got {parents!r}")
    return TreeSpec(tuple(int(x) for x in arr))


def available_trees() -> tuple[str, ...]:
    """Names of the tree files in `configs/trees/`."""
    return tuple(sorted(p.stem for p in TREES_DIR.glob("*.toml")))


def load_tree(name_or_path: str | os.PathLike) -> TreeSpec:
    """Load `configs/trees/<name>.toml` by name, or any tree file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"{path}: tree file not found")
        return TreeSpec.from_toml(path)
    named = TREES_DIR / f"{name_or_path}.toml"
    if not named.is_file():
        raise ConfigError(
            f"unknown tree {str(name_or_path)!r}; available in {TREES_DIR}: "
            f"{', '.join(available_trees()) or '(none)'} (or pass a path to a .toml file)"
        )
    return TreeSpec.from_toml(named)
