"""Deploying fedrec on real devices: credentials, device data, launch helpers."""
