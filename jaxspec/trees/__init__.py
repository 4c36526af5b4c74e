"""Speculation trees: the static `TreeSpec` topology, builders, and the tree-file loader."""

from jaxspec.trees.builders import TREES_DIR, available_trees, chain, from_parents, kary, load_tree
from jaxspec.trees.spec import TreeSpec

__all__ = [
    "TREES_DIR",
    "TreeSpec",
    "available_trees",
    "chain",
    "from_parents",
    "kary",
    "load_tree",
]
