"""Measurement: timing, memory and FLOPs."""
