"""What a score means: one :class:`Metric` description used by the trainer, records, plots, CLI.

Results files and the records database store the metric by its ``key`` (``acc_mean``, ``mse``)
or its ``name``; :func:`metric_named` accepts either. This module imports nothing heavy, so
runs.py and the records can use it without loading Paddle.
"""

from __future__ import annotations

from dataclasses import dataclass

from metalearn.rl.settings import RL_DATASETS


@dataclass(frozen=True)
class Metric:
    """A score's name, which direction is better, its short key and its label in figures."""

    name: str
    higher_is_better: bool
    key: str  # short form: results-file keys (``acc_mean``) and runs.py's table
    label: str  # axis label
    digits: int = 4

    def better(self, score: float, than: float | None) -> bool:
        """Whether ``score`` beats ``than`` (anything beats no score yet)."""
        if than is None:
            return True
        return score > than if self.higher_is_better else score < than

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"

    @property
    def direction(self) -> str:
        """ "higher" or "lower", as in "(higher is better)"."""
        return "higher" if self.higher_is_better else "lower"


ACCURACY = Metric("accuracy", higher_is_better=True, key="acc", label="accuracy")
MSE = Metric("mse", higher_is_better=False, key="mse", label="MSE")
RETURN = Metric("return", higher_is_better=True, key="return", label="average return", digits=2)
METRICS = (ACCURACY, MSE, RETURN)


def metric_named(name: str | None) -> Metric | None:
    """The metric called ``name`` (its name or its key), or None for an unknown one."""
    return next((m for m in METRICS if name in (m.name, m.key)), None)


def metric_for(dataset: str | None) -> Metric:
    """The metric of a dataset: accuracy for images, MSE for sinusoid regression, the average
    return for reinforcement learning."""
    if dataset in RL_DATASETS:
        return RETURN
    return MSE if dataset == "sinusoid" else ACCURACY


def results_metric(results: dict) -> Metric:
    """The metric of an evaluation's results (the one whose ``<key>_mean`` they hold)."""
    for metric in METRICS:
        if f"{metric.key}_mean" in results:
            return metric
    raise KeyError("no metric in these results")
