"""Differential privacy for local training: DP-SGD (Opacus) and privacy accounting."""
