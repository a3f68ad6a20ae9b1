"""Simulation runner, presets and sweeps."""
