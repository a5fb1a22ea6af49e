"""The core: data, models, losses, steps, the Trainer and its hooks, evaluation, checkpoints.

Nothing here knows a command-line flag.
"""
