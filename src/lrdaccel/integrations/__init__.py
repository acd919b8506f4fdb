"""Deprecated: the Hugging Face callback moved to `lrdaccel.training.hf`."""
