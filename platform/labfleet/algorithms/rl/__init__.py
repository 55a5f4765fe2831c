"""Reinforcement-learning algorithms, one module each, reading top to bottom like their pseudocode."""
