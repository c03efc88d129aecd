"""Recipes that live beside the library, not in its wheel: run them from a source checkout."""
