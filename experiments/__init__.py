"""Experiments that check the method works, built on the library (not part of the training product)."""
