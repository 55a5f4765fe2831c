"""Seeds derived from a run's seed: one function, so every stream in labfleet is derived the same way."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from a run seed and any further indices or labels, via numpy's SeedSequence."""
    entropy = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def rng_state(gen: np.random.Generator) -> dict[str, Any]:
    """A numpy Generator's state in a form `torch.load(weights_only=True)` accepts (ints, strings)."""
    state = gen.bit_generator.state
    return {"bit_generator": state["bit_generator"], "state": {k: int(v) for k, v in state["state"].items()},
            "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}


def set_rng_state(gen: np.random.Generator, state: dict[str, Any]) -> None:
    gen.bit_generator.state = state
