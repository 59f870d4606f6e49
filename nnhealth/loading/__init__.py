"""Resolving the model, the batch and the loss. Safe by default: no arbitrary unpickling."""
