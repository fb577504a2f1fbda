"""A run from flags to results: what train.py, evaluate.py and the notebook call.

``config.py`` maps flags to one config dict and checks it; ``problems.py`` builds the network and
task samplers a config names; ``trainer.py`` meta-trains (log, validation, checkpoints, resume);
``evaluation.py`` tests a checkpoint on fixed tasks; ``distributed.py`` shares a meta-batch over
processes; ``device.py`` picks CPU or GPU; ``notebook.py`` serves main.ipynb.
"""
