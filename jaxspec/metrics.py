"""One metrics schema for every method (DESIGN §6).

tau: tokens emitted per target forward (verify) step, bonus token included; AR = 1.0.
acceptance_rate: accepted drafted tokens / drafted tokens (None when nothing was drafted).
per_depth_acceptance / per_rank_acceptance: speculative diagnostics (empty lists for AR).
tokens_per_s: decode throughput = tokens emitted after each row's first ÷ decode seconds, summed
over rows (aggregate over the batch). ttft_s: mean prefill time per batch (time to first token).
draft_s / verify_s / other_s: decode time split. The speculative step is one fused jitted
function, so draft_s and verify_s are estimated: the draft phase and the verify forward are timed
separately at the step's shapes (median of 3) and multiplied by the steps; other_s (accept walk,
commit, loop) is the rest of decode_s. For AR, verify_s = decode_s.
compile_s: compilation, never mixed into the rest.
speedup_vs_ar: measured in the same process run against jaxspec's own AR path (None if not run).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Metrics:
    method: str = "ar"
    num_prompts: int = 0
    new_tokens: int = 0
    target_steps: int = 0
    tau: float = 1.0
    acceptance_rate: float | None = None
    per_depth_acceptance: list[float] = dataclasses.field(default_factory=list)
    per_rank_acceptance: list[float] = dataclasses.field(default_factory=list)
    tokens_per_s: float = 0.0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    compile_s: float = 0.0
    speedup_vs_ar: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
