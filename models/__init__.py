"""Torch modules, activations and weight-init schemes."""
