"""Hooks into other training frameworks; each submodule imports its framework, so import it by name.

- `lrdaccel.integrations.hf`: `SequentialFreezingCallback` for the Hugging Face `Trainer`.
"""
