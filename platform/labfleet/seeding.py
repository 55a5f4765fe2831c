"""Seeds derived from a run's seed: one function, so every stream in labfleet is derived the same way."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed from a run seed and any further indices or labels, via numpy's SeedSequence."""
    entropy = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
