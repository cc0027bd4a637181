"""Training: the loop and its per-step metrics."""
