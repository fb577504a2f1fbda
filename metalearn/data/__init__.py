"""Data: Omniglot and image folders packed into checked .npy sets, and the tasks drawn from them.

``omniglot.py`` and ``folders.py`` pack a source into arrays (``packing.py`` writes and commits a
set as a whole, ``images.py`` is the one preprocessing function); ``tasks.py`` draws N-way K-shot
tasks (and the sinusoid family) from them, each from its own seeded generator.
"""
