"""Verification: node rules (exact output laws) and the proposal samplers they pair with.

See `jaxspec.verify.rules` for the conventions (shapes, float32, invalid children = -1) and
`jaxspec.verify.proposals` for which sampler goes with which rule.
"""

from jaxspec.verify.proposals import draw_iid, draw_select, draw_spechub, draw_swor, draw_topk
from jaxspec.verify.rules import (
    HUB_THRESHOLD,
    NodeResult,
    check_distinct_siblings,
    dedup_siblings,
    greedy,
    hub_flag,
    point_mass,
    rrs,
    sample_node,
    select_rule,
    sequential,
    softmax,
    spechub,
    swor,
)

__all__ = [
    "HUB_THRESHOLD",
    "NodeResult",
    "check_distinct_siblings",
    "dedup_siblings",
    "draw_iid",
    "draw_select",
    "draw_spechub",
    "draw_swor",
    "draw_topk",
    "greedy",
    "hub_flag",
    "point_mass",
    "rrs",
    "sample_node",
    "select_rule",
    "sequential",
    "softmax",
    "spechub",
    "swor",
]
