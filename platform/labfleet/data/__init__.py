"""Datasets for generative models: everything ships with the code or is generated (no downloads)."""
