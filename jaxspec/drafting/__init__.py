"""Drafters: who proposes the speculated tree tokens.

A model drafter is any jaxspec model sharing the target's tokenizer: a separate small checkpoint,
or a layer-skip self-draft built from the target (`layer_skip`). It runs the same pure `forward`
over the whole tree once per level (tokens not drawn yet are ignored through the ancestor mask;
a chain feeds one new token per level), plus once more so every node has draft KV, which the
step commits like the target's.

The n-gram drafter (SSSD, `ngram`) needs no model: it builds each row's candidate tree on device
from matches in the row's own history and an optional token datastore (`datastore`).
"""

from jaxspec.drafting.model import ModelDraft, default_skip_layers, layer_skip
from jaxspec.drafting.ngram import NgramConfig, ngram_tree

_SEARCH = ("Candidate", "default_candidates", "search_layer_skip")


def __getattr__(name: str):
    # the layer-skip search runs generation (runner → speculative → drafting.ngram): import it
    # on first use so that `jaxspec.speculative` can import this package
    if name in _SEARCH:
        from jaxspec.drafting import search

        return getattr(search, name)
    raise AttributeError(f"module 'jaxspec.drafting' has no attribute {name!r}")


__all__ = [
    "Candidate",
    "ModelDraft",
    "NgramConfig",
    "default_candidates",
    "default_skip_layers",
    "layer_skip",
    "ngram_tree",
    "search_layer_skip",
]
