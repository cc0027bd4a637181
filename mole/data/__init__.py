"""Multi-domain image-text data: sample parsing and validation, per-domain streams, mixing, batching."""
