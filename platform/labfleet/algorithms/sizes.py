"""Bounded sizes shared by the hyperparameter models.

A spec with `n_envs: 1000000000` or a buffer of a billion transitions is a typo, not an experiment: these
bounds refuse it at validation (exit 2, nothing started) instead of inside a trial, as an out-of-memory
kill. Each bound is far above what the largest published setups of its kind use (Atari: 8-256 envs,
replay buffers of 1M transitions; PureJaxRL-style batching: a few thousand envs).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_ENVS = 16_384
MAX_STEPS = 1_000_000
MAX_BUFFER = 50_000_000
MAX_BATCH = 4_194_304
MAX_WIDTH = 65_536

EnvCount = Annotated[int, Field(gt=0, le=MAX_ENVS)]
StepCount = Annotated[int, Field(gt=0, le=MAX_STEPS)]
BufferSize = Annotated[int, Field(gt=0, le=MAX_BUFFER)]
BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH)]
Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]
