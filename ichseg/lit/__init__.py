"""The Lightning layer: the LightningModules, the DataModule and the callbacks.

The only package that imports ``pytorch_lightning``; it wires the Lightning-free stages (data,
models, inference, eval) into a Trainer. See docs/README.md for the map of the package.
"""
