"""Discounted returns, generalised advantage estimation and advantage normalisation (numpy).

Arrays are [tasks, horizon, trajectories] with a ``mask`` that is 1 while an episode runs (up to
and including the step that ended it) and 0 afterwards; masked steps contribute nothing.
"""

from __future__ import annotations

import numpy as np


def discounted_returns(rewards: np.ndarray, mask: np.ndarray, gamma: float) -> np.ndarray:
    """R_t = Σ_{l≥0} γ^l r_{t+l} over the episode's remaining steps."""
    returns = np.zeros_like(rewards)
    running = np.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> np.ndarray:
    """Schulman et al.'s GAE(γ, λ): Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V(s_{t+1}) − V(s_t), with
    V = 0 after an episode's end. λ = 1 gives R_t − V(s_t), λ = 0 the one-step δ_t."""
    next_values = np.zeros_like(values)
    next_values[:, :-1] = values[:, 1:] * mask[:, 1:]
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = np.zeros_like(rewards)
    running = np.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages


def normalise_per_task(advantages: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each task's advantages shifted and scaled to mean 0 and standard deviation 1 over its
    valid steps (both reference codes do this; it makes α's scale independent of the reward's)."""
    axes = tuple(range(1, advantages.ndim))
    count = mask.sum(axis=axes, keepdims=True)
    mean = (advantages * mask).sum(axis=axes, keepdims=True) / count
    var = (np.square(advantages - mean) * mask).sum(axis=axes, keepdims=True) / count
    return (advantages - mean) / (np.sqrt(var) + 1e-8) * mask
