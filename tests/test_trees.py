"""TreeSpec invariants: hand-written tables, visual 0/1 masks, validation, hashing, tree files."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.errors import ConfigError
from jaxspec.trees import (
    TREES_DIR,
    TreeSpec,
    available_trees,
    chain,
    from_parents,
    kary,
    load_tree,
)

IRREGULAR = (-1, 0, 0, 1, 1, 2)  # root → {1, 2}; 1 → {3, 4}; 2 → {5}

# Every file in configs/trees/ and the builder call that generated it.
BUILT = {
    "chain4": chain(4),
    "chain8": chain(8),
    "kary_2x3": kary(2, 3),
    "kary_2x2": kary(2, 2),
    "kary_3x1": kary(3, 1),
    "kary_4x2": kary(4, 2),
    "irregular_9": from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 5]),
    # Sequoia's DP trees of 7 nodes for the trained draft's committed acceptance profiles
    "sequoia7_draft_T0": from_parents([-1, 0, 0, 0, 1, 2, 4]),
    "sequoia7_draft_T06": from_parents([-1, 0, 0, 0, 1, 1, 2]),
}


def grid(text: str) -> np.ndarray:
    """A 0/1 matrix written one row per line, e.g. "1 0\\n1 1"."""
    return np.array([[c == "1" for c in row.split()] for row in text.strip().splitlines()])


def test_chain3_mask_is_lower_triangular():
    t = chain(3)
    expected = grid("""
        1 0 0 0
        1 1 0 0
        1 1 1 0
        1 1 1 1
    """)
    np.testing.assert_array_equal(t.ancestor_mask, expected)


def test_irregular_mask():
    t = from_parents(IRREGULAR)
    #   node: 0 1 2 3 4 5
    expected = grid("""
        1 0 0 0 0 0
        1 1 0 0 0 0
        1 0 1 0 0 0
        1 1 0 1 0 0
        1 1 0 0 1 0
        1 0 1 0 0 1
    """)
    np.testing.assert_array_equal(t.ancestor_mask, expected)


def test_irregular_tables():
    t = from_parents(IRREGULAR)
    assert (t.num_nodes, t.num_speculated, t.max_depth, t.max_width) == (6, 5, 2, 2)
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(t.rank, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(t.num_children, [2, 2, 1, 0, 0, 0])
    np.testing.assert_array_equal(
        t.children, [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]
    )
    np.testing.assert_array_equal(t.parent_array, IRREGULAR)
    assert t.level_slices == ((0, 1), (1, 3), (3, 6))
    assert t.paths == ((0,), (0, 1), (0, 2), (0, 1, 3), (0, 1, 4), (0, 2, 5))
    assert t.path_to(5) == (0, 2, 5)
    assert not t.is_chain
    assert t.depth.dtype == t.rank.dtype == t.children.dtype == np.int32
    assert t.ancestor_mask.dtype == bool


@pytest.mark.parametrize("tree", list(BUILT.values()) + [chain(0), from_parents(IRREGULAR)])
def test_invariants(tree):
    t = tree
    np.testing.assert_array_equal(t.position_offsets, t.depth)  # depth-based positions
    # mask row i == the nodes on the path root→i; its size is depth + 1
    for i in range(t.num_nodes):
        assert tuple(np.flatnonzero(t.ancestor_mask[i])) == t.path_to(i)
    np.testing.assert_array_equal(t.ancestor_mask.sum(1), t.depth + 1)
    # children table and parents agree; ranks number siblings 0, 1, ...
    for p in range(t.num_nodes):
        kids = [c for c in t.children[p] if c >= 0]
        assert kids == [i for i in range(1, t.num_nodes) if t.parents[i] == p]
        assert [t.rank[c] for c in kids] == list(range(len(kids)))
        assert len(kids) == t.num_children[p]
    # each level slice holds exactly the nodes of that depth
    for d, (a, b) in enumerate(t.level_slices):
        assert np.all(t.depth[a:b] == d)
    assert t.level_slices[0] == (0, 1) and t.level_slices[-1][1] == t.num_nodes
    # derived tables are read-only (they are cached and shared)
    with pytest.raises(ValueError):
        t.depth[0] = 1


def test_chain_and_kary_shapes():
    root = chain(0)  # plain AR decoding: the root only
    assert root.parents == (-1,) and root.num_nodes == 1 and root.max_depth == 0
    assert root.is_chain and root.max_width == 1 and root.level_slices == ((0, 1),)
    np.testing.assert_array_equal(root.children, [[-1]])
    assert chain(4).is_chain and chain(4).max_depth == 4
    assert kary(1, 5) == chain(5)
    assert kary(3, 0) == chain(0)
    for w, d in [(2, 3), (3, 2), (4, 2), (2, 1)]:
        t = kary(w, d)
        assert t.num_speculated == sum(w**k for k in range(1, d + 1))
        assert t.max_depth == d and t.max_width == w
        assert [b - a for a, b in t.level_slices] == [w**k for k in range(d + 1)]
    assert kary(2, 3).num_speculated == 14


@pytest.mark.parametrize(
    "parents, match",
    [
        ((), "empty"),
        ((0, 0), "node 0 must be the root"),
        ((-1, 0, -1), "node 2: second root"),
        ((-1, 2, 0), "node 1: parent 2 is not an earlier node"),
        ((-1, 0, 2), "node 2: parent 2 is not an earlier node"),
        ((-1, 0, 0, 2, 1), "node 4: parent 1 comes after parent 2 of node 3"),  # cousins swapped
        ((-1, 0, 1, 0), "node 3: parent 0 comes after parent 1"),  # siblings not contiguous
        ((-1, True), "node 1: parent True is not an int"),
        ((-1, np.int64(0)), r"node 1: parent np.int64\(0\) is not an int"),
        ([-1, 0], "must be a tuple"),
    ],
)
def test_validation_errors(parents, match):
    with pytest.raises(ConfigError, match=match):
        TreeSpec(parents)


def test_builder_errors():
    with pytest.raises(ConfigError, match="chain length"):
        chain(-1)
    with pytest.raises(ConfigError, match="kary width"):
        kary(0, 2)
    with pytest.raises(ConfigError, match="1-D sequence of ints"):
        from_parents(np.array([-1.0, 0.0]))
    with pytest.raises(ConfigError, match="node 0 must be the root"):
        from_parents([0, 0])  # the root's -1 is required
    assert from_parents(np.array([-1, 0, 0])) == TreeSpec((-1, 0, 0))


def test_hash_and_equality():
    a, b = from_parents([-1, 0, 1, 2]), chain(3)
    assert a == b and hash(a) == hash(b) and a is not b
    _ = a.ancestor_mask  # a filled cache must not change equality or hashing
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert chain(3) != kary(3, 1)
    assert repr(chain(2)) == "TreeSpec(N=2, D=2, parents=(-1, 0, 1))"


def test_static_jit_argument_traces_once():
    traces = []

    def f(x, tree):
        traces.append(tree)
        return x + jnp.asarray(tree.position_offsets)

    g = jax.jit(chex.assert_max_traces(f, n=2), static_argnames=("tree",))
    x = jnp.zeros(4, jnp.int32)
    g(x, tree=chain(3))
    g(x, tree=from_parents([-1, 0, 1, 2]))  # equal spec: cache hit
    assert len(traces) == 1
    g(jnp.zeros(4, jnp.int32), tree=from_parents([-1, 0, 0, 1]))  # new topology retraces
    assert len(traces) == 2


@pytest.mark.parametrize("name", sorted(BUILT))
def test_tree_files_load_and_round_trip(name):
    t = load_tree(name)
    assert t == BUILT[name]  # the file is what its builder makes
    assert load_tree(TREES_DIR / f"{name}.toml") == t
    assert TreeSpec.from_toml(t.to_toml(name=name, description="x")) == t
    text = (TREES_DIR / f"{name}.toml").read_text()
    assert "description = " in text and f'name = "{name}"' in text


def test_every_tree_file_is_listed():
    assert set(available_trees()) == set(BUILT)


def test_toml_round_trip_long_and_quoted(tmp_path):
    t = kary(3, 3)  # 39 nodes: parents wrap over several lines
    text = t.to_toml(name='q"uote', description="back\\slash\nnewline")
    assert max(map(len, text.splitlines())) <= 100
    path = tmp_path / "big.toml"
    path.write_text(text)
    assert TreeSpec.from_toml(path) == t == load_tree(str(path))


@pytest.mark.parametrize(
    "body, match",
    [
        ("parents = [-1, 0]\nwidth = 3\n", "unknown key 'width'"),
        ("name = 'x'\n", "missing required key 'parents'"),
        ("parents = [-1, 0, 0, 2, 1]\n", "node 4: parent 1 comes after"),
        ("parents = [-1, 0.5]\n", "list of integers"),
        ("parents = [-1, 0\n", "invalid TOML"),
        ("description = 3\nparents = [-1]\n", "'description' must be a string"),
    ],
)
def test_toml_errors_name_the_file(tmp_path, body, match):
    path = tmp_path / "bad_tree.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as e:
        load_tree(path)
    assert "bad_tree.toml" in str(e.value)


def test_unknown_tree_name_lists_available():
    with pytest.raises(ConfigError, match="unknown tree 'nope'.*chain4.*kary_2x3"):
        load_tree("nope")
    with pytest.raises(ConfigError, match="missing.toml: tree file not found"):
        load_tree("somewhere/missing.toml")


@pytest.mark.parametrize("name,temp", [("sequoia7_draft_T0", "0"), ("sequoia7_draft_T06", "0.6")])
def test_committed_sequoia_trees_are_the_dp_optimum_of_their_profile(name, temp):
    from jaxspec.profiling import read_profile
    from jaxspec.trees.sequoia import SequoiaDP

    p = read_profile(f"smollm2-135m__draft__T{temp}")["p"]  # a profile name with a dot (T0.6)
    dp = SequoiaDP(tuple(p), 7, 8, len(p))
    assert load_tree(name) == dp.tree(7, 8)
