"""Offline examples: the real-data demo and a tiny built-in smoke example."""
