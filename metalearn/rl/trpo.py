"""Trust-region policy optimisation's step (Schulman et al. 2015), as MAML's outer optimiser.

The caller supplies the loss's gradient g, a Fisher-vector product v ↦ F v (the Hessian of the
mean KL between the old and new post-update policies, taken through the inner update) and a way
to try a step. The step solves (F + λI) x = g by conjugate gradient, scales x to the trust
region's edge ½ sᵀ(F + λI)s = δ, and backtracks until the loss decreases and the KL is within δ
(else θ stays where it was). Vectors are flat float64 numpy arrays (a policy has ~10⁴ weights;
the products themselves run in Paddle). Settings follow the paper's code and pytorch-maml-rl's
configs: 10 CG iterations, damping 1e-5, 15 backtracking steps of ratio 0.8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Vector = np.ndarray


def conjugate_gradient(
    product: Callable[[Vector], Vector], b: Vector, iterations: int = 10, tolerance: float = 1e-10
) -> Vector:
    """Approximately solve A x = b for a symmetric positive-definite A given as ``product``."""
    x = np.zeros_like(b)
    residual = b.copy()
    direction = b.copy()
    squared = residual @ residual
    for _ in range(iterations):
        if squared < tolerance:
            break
        image = product(direction)
        step = squared / (direction @ image)
        x += step * direction
        residual -= step * image
        new_squared = residual @ residual
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
    return x


@dataclass
class StepReport:
    """What one TRPO step did: the accepted fraction of the full step (0: rejected), the loss and
    the mean KL it reached."""

    fraction: float
    loss: float
    kl: float


@dataclass
class TRPO:
    """The outer optimiser. It keeps no state between steps (checkpoints hold nothing of it)."""

    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtrack_ratio: float = 0.8
    line_search_steps: int = 15

    def full_step(self, gradient: Vector, fisher_product: Callable[[Vector], Vector]) -> Vector:
        """The step s (θ ← θ − s) to the trust region's edge along the natural gradient."""

        def damped(v: Vector) -> Vector:
            return fisher_product(v) + self.cg_damping * v

        x = conjugate_gradient(damped, gradient, self.cg_iterations)
        curvature = x @ damped(x)
        if not (np.isfinite(curvature) and curvature > 0):
            return np.zeros_like(gradient)
        return np.sqrt(2 * self.max_kl / curvature) * x

    def step(
        self,
        gradient: Vector,
        fisher_product: Callable[[Vector], Vector],
        try_step: Callable[[Vector], tuple[float, float]],
        loss_before: float,
    ) -> StepReport:
        """Search along the full step; ``try_step(s)`` moves θ to θ_old − s and returns (loss,
        KL) there. On failure θ is put back (``try_step`` of zeros)."""
        step = self.full_step(gradient, fisher_product)
        fraction = 1.0
        if step.any():
            for _ in range(self.line_search_steps):
                loss, kl = try_step(fraction * step)
                if loss < loss_before and kl <= self.max_kl:
                    return StepReport(fraction, loss, kl)
                fraction *= self.backtrack_ratio
        loss, kl = try_step(np.zeros_like(step))
        return StepReport(0.0, loss, kl)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def set_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Nothing to restore."""
