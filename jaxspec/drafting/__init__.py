"""Drafters: who proposes the speculated tree tokens.

A model drafter is any jaxspec model sharing the target's tokenizer: a separate small checkpoint,
or a layer-skip self-draft built from the target (`layer_skip`). It runs the same pure `forward`
over the whole tree once per level (tokens not drawn yet are ignored through the ancestor mask),
plus once more so every node has draft KV, which the step commits like the target's.
"""

from jaxspec.drafting.model import ModelDraft, default_skip_layers, layer_skip
from jaxspec.drafting.search import Candidate, default_candidates, search_layer_skip

__all__ = [
    "Candidate",
    "ModelDraft",
    "default_candidates",
    "default_skip_layers",
    "layer_skip",
    "search_layer_skip",
]
