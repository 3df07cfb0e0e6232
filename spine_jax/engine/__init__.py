"""The engine: what runs a network on devices, for training and inference alike.

mesh (devices and shardings), state (train state, optimiser), checkpoints (orbax), predict (the
sharded, padded predict functions), networks (the one network builder). It knows models and data,
never a task, an inference pipeline or an entry point.
"""
