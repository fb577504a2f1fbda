"""The meta-learning algorithm over a network and tasks, independent of how a run is driven.

``learner.py``: :class:`~metalearn.learning.learner.MetaLearner` (inner loop, query losses, the
meta-update); ``inner_rules.py``: the inner update (SGD, per-step rates, Meta-SGD);
``variants.py``: each algorithm's direction per task and outer optimiser (MAML, FOMAML, MAML++,
Reptile, pretraining); ``meta_optimizers.py``: Adam and SGD over the meta-parameters;
``gradcheck.py``: the meta-gradient against float64 finite differences; ``api.py``:
``metalearn.MAML``, the clone/adapt API for a user's ``paddle.nn.Layer`` over the same learner.
"""
