"""Meta-reinforcement learning (the MAML paper's section 5.3): 2D navigation and half-cheetah.

A Gaussian MLP policy adapts to a task with vanilla policy-gradient steps on trajectories it
samples itself; the meta-update is TRPO (or Adam) on the post-update policies' surrogate, with the
meta-gradient and the KL's curvature taken through the inner update. Modules by concern:
settings.py (names and defaults, no Paddle), envs.py (vectorised environments), policy.py,
sampler.py (rollouts), baseline.py (linear feature baseline), returns.py (returns, GAE),
trpo.py (conjugate gradient, line search), learner.py (inner loop and meta-update),
problem.py (what train.py and evaluate.py need), figures.py (plots).
"""
