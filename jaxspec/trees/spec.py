"""`TreeSpec`: the static topology of a speculation tree.

Conventions (ALGORITHMS.md §0.4):
  * Node 0 is the root: the last emitted token, whose KV is not cached yet. Nodes 1..N are the
    speculated tokens. T = N + 1 nodes in all; they are the T in-flight tokens of one forward.
  * `parents` is the only primary field: `parents[0] == -1`, `parents[i]` is node i's parent.
  * Canonical numbering (enforced): `parents[1:]` is non-decreasing and `parents[i] < i`. So nodes
    are numbered level by level (depth never decreases), children are grouped by parent in parent
    order, and siblings are contiguous. This is the order Sequoia and Medusa trees use; it makes
    every depth a contiguous `level_slices` range, so a draft can run one level per forward.
  * `rank[i]` is node i's order among its siblings (0 = first); it is also the verification order.
    Siblings have increasing indices, so rank order == index order.
  * Positions are depth-based: node i sits at position `length + depth[i]` (`position_offsets`),
    never `length + i`, or branches would verify at wrong RoPE positions.
  * `ancestor_mask[i, j]` is True iff j is i or an ancestor of i: the attention mask over the
    in-flight tokens (node i sees node j iff `mask[i, j]`).
  * W = `max_width`, the largest number of children of any node (at least 1); the `children`
    table is padded to W with -1.

Derived tables are numpy arrays computed once, on first use, with `functools.cached_property`
(which writes the instance `__dict__` directly, so it works on a frozen dataclass without
`object.__setattr__`); they are read-only. Equality and hashing use `parents` only, so a
`TreeSpec` is a valid static `jax.jit` argument: one topology compiles once.

Tree files are TOML: `parents = [-1, 0, 0, 1, ...]` plus optional `name` and `description`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
from pathlib import Path

import numpy as np

from jaxspec.errors import ConfigError
from jaxspec.types import Bool, Int

_TOML_KEYS = ("name", "description", "parents")


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # cached and shared: a caller must not edit it in place
    return a


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """Static speculation tree; see the module docstring for conventions."""

    parents: tuple[int, ...]

    def __post_init__(self):
        p = self.parents
        if not isinstance(p, tuple):
            raise ConfigError(
                f"TreeSpec.parents must be a tuple of ints, got {type(p).__name__}; "
                "use jaxspec.trees.from_parents to convert a list or array"
            )
        if not p:
            raise ConfigError("TreeSpec.parents is empty; it needs at least the root (-1)")
        for i, x in enumerate(p):
            if type(x) is not int:  # not bool or np.int64: keeps hashing and repr plain
                raise ConfigError(f"tree node {i}: parent {x!r} is not an int")
        if p[0] != -1:
            raise ConfigError(f"tree node 0 must be the root (parent -1), got parent {p[0]}")
        for i in range(1, len(p)):
            if p[i] == -1:
                raise ConfigError(f"tree node {i}: second root (parent -1); only node 0 is root")
            if not 0 <= p[i] < i:
                raise ConfigError(
                    f"tree node {i}: parent {p[i]} is not an earlier node "
                    f"(need 0 <= parent < {i}: parents come before their children)"
                )
            if p[i] < p[i - 1]:
                raise ConfigError(
                    f"tree node {i}: parent {p[i]} comes after parent {p[i - 1]} of node {i - 1}; "
                    "number nodes level by level with children grouped by parent in parent "
                    "order (parents[1:] must be non-decreasing)"
                )

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """T = N + 1, the in-flight tokens of one tree forward (root included)."""
        return len(self.parents)

    @property
    def num_speculated(self) -> int:
        """N, the speculated tokens (root excluded)."""
        return len(self.parents) - 1

    @functools.cached_property
    def max_depth(self) -> int:
        """D, the depth of the deepest node (0 for the root-only tree)."""
        return int(self.depth.max())

    @functools.cached_property
    def max_width(self) -> int:
        """W, the largest fan-out of any node (at least 1, so tables are never empty)."""
        return max(1, int(self.num_children.max()))

    # ---- per-node tables ------------------------------------------------------------------

    @functools.cached_property
    def parent_array(self) -> Int[np.ndarray, " T"]:
        """`parents` as int32 (root -1)."""
        return _frozen(np.asarray(self.parents, np.int32))

    @functools.cached_property
    def depth(self) -> Int[np.ndarray, " T"]:
        """Edges from the root (root 0)."""
        d = np.zeros(self.num_nodes, np.int32)
        for i in range(1, self.num_nodes):
            d[i] = d[self.parents[i]] + 1
        return _frozen(d)

    @property
    def position_offsets(self) -> Int[np.ndarray, " T"]:
        """Node i's position is `length + position_offsets[i]`; equal to `depth`."""
        return self.depth

    @functools.cached_property
    def rank(self) -> Int[np.ndarray, " T"]:
        """Order among siblings = verification order (root 0)."""
        r = np.zeros(self.num_nodes, np.int32)
        seen = np.zeros(self.num_nodes, np.int32)  # children seen so far, per parent
        for i in range(1, self.num_nodes):
            r[i] = seen[self.parents[i]]
            seen[self.parents[i]] += 1
        return _frozen(r)

    @functools.cached_property
    def num_children(self) -> Int[np.ndarray, " T"]:
        counts = np.bincount(self.parent_array[1:], minlength=self.num_nodes)
        return _frozen(counts.astype(np.int32))

    @functools.cached_property
    def children(self) -> Int[np.ndarray, "T W"]:
        """`children[i, r]` is node i's child of rank r, or -1 past `num_children[i]`."""
        c = np.full((self.num_nodes, self.max_width), -1, np.int32)
        for i in range(1, self.num_nodes):
            c[self.parents[i], self.rank[i]] = i
        return _frozen(c)

    @functools.cached_property
    def ancestor_mask(self) -> Bool[np.ndarray, "T T"]:
        """Ancestor-or-self: `mask[i, j]` iff j is on the path root→i (the in-flight mask)."""
        m = np.zeros((self.num_nodes, self.num_nodes), bool)
        m[0, 0] = True
        for i in range(1, self.num_nodes):
            m[i] = m[self.parents[i]]  # parents come first, so their row is complete
            m[i, i] = True
        return _frozen(m)

    # ---- structure ------------------------------------------------------------------------

    @functools.cached_property
    def level_slices(self) -> tuple[tuple[int, int], ...]:
        """`(start, stop)` node range of each depth 0..D; level 0 is `(0, 1)`, the root.

        Always defined: the canonical numbering puts each depth in one contiguous range.
        """
        starts = np.searchsorted(self.depth, np.arange(self.max_depth + 2))
        return tuple((int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True))

    @property
    def is_chain(self) -> bool:
        """Every node has at most one child (includes the root-only tree, plain AR decoding)."""
        return self.max_width == 1

    def path_to(self, i: int) -> tuple[int, ...]:
        """Node ids from the root to node i, both included."""
        if not 0 <= i < self.num_nodes:
            raise IndexError(f"node {i} is not in a tree of {self.num_nodes} nodes")
        return self.paths[i]

    @functools.cached_property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """`paths[i]` = node ids root→i; `len(paths[i]) == depth[i] + 1`."""
        out: list[tuple[int, ...]] = [(0,)]
        for i in range(1, self.num_nodes):
            out.append(out[self.parents[i]] + (i,))
        return tuple(out)

    def __repr__(self) -> str:
        p = self.parents
        body = ", ".join(map(str, p[:32])) + (", ..." if len(p) > 32 else "")
        return f"TreeSpec(N={self.num_speculated}, D={self.max_depth}, parents=({body}))"

    # ---- TOML -----------------------------------------------------------------------------

    def to_toml(self, name: str | None = None, description: str | None = None) -> str:
        """The tree as a TOML document that `from_toml` reads back."""
        lines = []
        if name is not None:
            lines.append(f"name = {_toml_str(name)}")
        if description is not None:
            lines.append(f"description = {_toml_str(description)}")
        one_line = f"parents = [{', '.join(map(str, self.parents))}]"
        if len(one_line) <= 100:
            lines.append(one_line)
        else:  # wrap long trees, 16 entries a line
            rows = [self.parents[i : i + 16] for i in range(0, len(self.parents), 16)]
            lines += ["parents = ["] + [f"  {', '.join(map(str, r))}," for r in rows] + ["]"]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, path_or_text: str | os.PathLike, source: str | None = None) -> TreeSpec:
        """Read a tree file (a path) or TOML text (a str containing "=" or a newline).

        `source` names the origin in error messages (default: the path, or "<string>").
        """
        text, source = _read_toml_source(path_or_text, source)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
        for key in doc:
            if key not in _TOML_KEYS:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in tree file; allowed: {', '.join(_TOML_KEYS)}"
                )
        for key in ("name", "description"):
            if key in doc and not isinstance(doc[key], str):
                raise ConfigError(f"{source}: {key!r} must be a string")
        if "parents" not in doc:
            raise ConfigError(f"{source}: missing required key 'parents'")
        parents = doc["parents"]
        if not isinstance(parents, list) or any(type(x) is not int for x in parents):
            raise ConfigError(f"{source}: 'parents' must be a list of integers, got {parents!r}")
        try:
            return cls(tuple(parents))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _read_toml_source(path_or_text: str | os.PathLike, source: str | None) -> tuple[str, str]:
    if isinstance(path_or_text, str) and ("=" in path_or_text or "\n" in path_or_text):
        return path_or_text, source or "<string>"
    path = Path(path_or_text)
    try:
        return path.read_text(encoding="utf-8"), source or str(path)
    except OSError as e:
        raise ConfigError(f"{source or path}: cannot read tree file: {e.strerror}") from None


def _toml_str(s: str) -> str:
    """A TOML basic string. JSON escapes are valid TOML escapes; TOML also forbids raw DEL."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")
