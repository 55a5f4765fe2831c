"""Environments, seeded vector samplers and evaluation; Ray rollout actors build on these."""
