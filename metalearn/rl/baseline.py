"""The linear feature baseline (Duan et al. 2016, rllab's LinearFeatureBaseline), fitted per task.

V(s_t) = w · φ(s_t, t) with φ = [s, s², t/100, (t/100)², (t/100)³, 1] on valid steps (0 on
masked ones), w from the ridge-regularised normal equations (XᵀX + cI) w = Xᵀ R with c = 1e-5,
multiplied by 10 until the solve succeeds, as both reference codes do. All tasks of a batch are
solved at once (batched ``numpy.linalg.solve``); each task is fitted to its own trajectories.
"""

from __future__ import annotations

import numpy as np

REGULARISATION = 1e-5
_ATTEMPTS = 5


def features(observations: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """φ for observations [T, H, N, d] → [T, H·N, 2d + 4]."""
    tasks, horizon, count, _ = observations.shape
    valid = mask[..., None]
    obs = observations * valid
    time = np.broadcast_to(np.arange(horizon)[None, :, None, None] / 100.0, valid.shape) * valid
    phi = np.concatenate([obs, obs**2, time, time**2, time**3, valid], axis=-1)
    return phi.reshape(tasks, horizon * count, -1)


def fit(phi: np.ndarray, returns: np.ndarray) -> np.ndarray:
    """Weights [T, F] of the regularised least-squares fit of returns [T, H·N] on φ [T, H·N, F]."""
    gram = np.einsum("tmf,tmg->tfg", phi, phi)
    target = np.einsum("tmf,tm->tf", phi, returns)
    eye = np.eye(phi.shape[-1])
    reg = REGULARISATION
    for _ in range(_ATTEMPTS):
        try:
            weights = np.linalg.solve(gram + reg * eye, target[..., None])[..., 0]
        except np.linalg.LinAlgError:
            weights = None
        if weights is not None and np.isfinite(weights).all():
            return weights
        reg *= 10
    raise ArithmeticError(f"the baseline's normal equations stay singular up to c = {reg / 10}")


def fit_values(observations: np.ndarray, returns: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """V(s_t) [T, H, N] of the baseline fitted to each task's own returns [T, H, N]."""
    phi = features(observations, mask)
    weights = fit(phi, returns.reshape(len(returns), -1))
    return np.einsum("tmf,tf->tm", phi, weights).reshape(returns.shape)
