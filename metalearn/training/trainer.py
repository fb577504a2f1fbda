"""The meta-training loop: sample tasks, step θ, log, validate, keep the best, checkpoint, resume.

Everything of a run lives in ``work_dir/<run_name>/``: ``config.json`` (every flag and what the
run depends on), ``best.npz`` (θ with the best validation score), ``last.npz`` (θ, optimiser
state, counters and history, for ``--resume``). Tasks are keyed by iteration (see tasks.py), so a
resumed run sees exactly the tasks an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from metalearn.data import folders, omniglot
from metalearn.errors import UserError
from metalearn.fileio import write_json
from metalearn.learning.learner import (
    NonFiniteError,
    initial_arrays,
    make_parameters,
)
from metalearn.rl.settings import RL_DATASETS
from metalearn.runs.checkpoint import (
    Checkpoint,
    check_compatible,
    export_legacy_pkl,
    load_checkpoint,
    save_checkpoint,
)
from metalearn.runs.names import check_run_name, check_work_dir
from metalearn.runs.records import (  # run record: work_dir/runs.sqlite + curves.png
    Recorder,
    describe_failure,
)
from metalearn.training import distributed
from metalearn.training.config import (
    read_run_config,
    resolve_defaults,
    validate_config,
)
from metalearn.training.device import select_device
from metalearn.training.problems import Problem, build_problem


@dataclass
class TrainState:
    """Everything besides θ and the optimiser that a resumed run must continue from."""

    iteration: int = 0
    elapsed_seconds: float = 0.0
    best_score: float | None = None
    best_iteration: int | None = None
    log: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: object, source: str) -> TrainState:
        """The state a checkpoint's meta holds, refused in one line unless it has exactly our
        fields with our types (a checkpoint of another version of the code)."""
        types = {
            "iteration": (int,),
            "elapsed_seconds": (int, float),
            "best_score": (int, float, type(None)),
            "best_iteration": (int, type(None)),
            "log": (list,),
            "validation": (list,),
        }
        if not isinstance(saved, dict) or set(saved) != {f.name for f in fields(cls)}:
            raise UserError(f"{source} holds no training state of this version of the code")
        for name, value in saved.items():
            if type(value) not in types[name]:
                raise UserError(f"{source}: training state {name}={value!r:.40} is invalid")
        if saved["iteration"] < 0 or not all(
            isinstance(entry, dict) for entry in saved["log"] + saved["validation"]
        ):
            raise UserError(f"{source}: its training state is invalid")
        return cls(**saved)


def run_name_for(config: dict) -> str:
    """``omniglot_5w1s_maml_seed0``, ``NAME_5w1s_...`` for an image folder, ``sinusoid_k10_...``."""
    if config["dataset"] == "sinusoid":
        return f"sinusoid_k{config['k_spt']}_{config['algo']}_seed{config['seed']}"
    if config["dataset"] in RL_DATASETS:  # nav2d_k20_maml_trpo_seed0, nav2d_k20_pretrain_oracle_…
        algo = f"{config['algo']}_oracle" if config["oracle"] else config["algo"]
        algo += "_normact" if config.get("normalized_actions") else ""
        return (
            f"{config['dataset']}_k{config['k_spt']}_{algo}_{config['outer']}_seed{config['seed']}"
        )
    dataset = config["data"] if config["dataset"] == "folder" else config["dataset"]
    algo = config["algo"].replace("+", "p")  # maml++ -> mamlpp: run names have no '+'
    return f"{dataset}_{config['n_way']}w{config['k_spt']}s_{algo}_seed{config['seed']}"


def prepare_config(given: dict) -> dict:
    """Resolve defaults, or on ``--resume`` take the run's saved config (``--epochs`` may grow)."""
    if given.get("resume"):
        run_dir = Path(os.path.abspath(given["resume"]))  # `work/x/..` is named `work`
        check_run_name(run_dir.name)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise UserError(f"--resume {run_dir}: no config.json there (not a run folder?)")
        config = read_run_config(config_path)
        for key in ("epochs", "use_gpu", "max_minutes", "kernels", "task_chunk"):
            if given.get(key) is not None:
                config[key] = given[key]
        config["resume"] = str(run_dir)
        config["run_name"] = run_dir.name
        config["work_dir"] = str(run_dir.parent)
        validate_config(config)
        return config
    config = resolve_defaults(given)
    validate_config(config)
    check_work_dir(config["work_dir"])
    given_name = config["run_name"]
    try:
        config["run_name"] = check_run_name(
            run_name_for(config) if given_name is None else given_name
        )
    except UserError as error:  # named as the flag, so the service shows it next to its field
        raise UserError(f"--run_name: {error}") from None
    return config


class Trainer:
    """One training run; ``run()`` goes from the current state to ``config['epochs']``."""

    def __init__(self, config: dict, force: bool = False):
        self.config = config
        self.force = force  # take over a run whose record says it is training (--resume --force)
        self.device = select_device(bool(config.get("use_gpu")))
        distributed.init()
        self.problem: Problem = build_problem(config, ("train", "val"))
        self.run_dir = Path(config["work_dir"]) / config["run_name"]
        self.state = TrainState()
        arrays = initial_arrays(self.problem.net, config)  # θ, then learned inner rates
        resume = self._load_resume_checkpoint(arrays) if config.get("resume") else None
        if resume is not None:
            arrays = {name: resume.params[name] for name in arrays}
        self.params = make_parameters(arrays)
        self.learner = self.problem.learner(
            self.problem.net, self.params, config, config["glob_update_step"]
        )
        self.optimizer = self.learner.make_optimizer()
        self.stop_requested = False
        if resume is not None:
            self.optimizer.set_state_dict(resume.optimizer)
            self.state = TrainState.from_saved(resume.meta.get("state"), self._last_path())
        elif (self.run_dir / "last.npz").exists():
            raise UserError(
                f"{self.run_dir} already holds a run: use --resume {self.run_dir} "
                "or another --run_name"
            )

    def _last_path(self) -> Path:
        return self.run_dir / "last.npz"

    def _load_resume_checkpoint(self, fresh: dict[str, np.ndarray]) -> Checkpoint:
        """last.npz, refused in one line unless the meta-parameters (θ and learned rates) and the
        optimiser state fit this network, inner rule and optimiser (Paddle refuses a wrong or
        missing moment with a traceback)."""
        shapes = {k: tuple(v.shape) for k, v in fresh.items()}
        checkpoint = load_checkpoint(self._last_path(), shapes)
        check_compatible(checkpoint, self.problem.net.config(), shapes)
        found = {k: tuple(v.shape) for k, v in checkpoint.optimizer.items()}
        if found != self.problem.optimizer_shapes(self.config, shapes):
            raise UserError(
                f"{self._last_path()}: its optimiser state is not the one this version keeps "
                f"for --algo {self.config['algo']} (written by another version of the code?)"
            )
        return checkpoint

    # -- run record (metalearn/runs/records.py): runs.sqlite status, history, curves.png --------------
    def run(self) -> TrainState:
        """Train to ``config['epochs']``, keeping the run's record in work_dir/runs.sqlite."""
        main = distributed.is_main()
        self.recorder = Recorder(self.config["work_dir"], self.config["run_name"]) if main else None
        if self.recorder is None:  # other processes compute; only the first one keeps records
            return self._train()
        self.recorder.start(
            self.config,
            self.state,
            resumed=bool(self.config.get("resume")),
            metric=self.problem.net.metric.name,
            higher_is_better=self.problem.net.metric.higher_is_better,
            device=self.device,
            paddle_version=paddle.__version__,
            force=self.force,
        )
        try:
            with self._stop_on_sigint():
                state = self._train()
        except BaseException as error:  # also Ctrl-C (interrupted) and the launcher's SIGTERM
            status, message = describe_failure(error)
            self.recorder.finish(status, self.state, message)
            raise
        self.recorder.finish("complete", self.state)
        return state

    @contextmanager
    def _stop_on_sigint(self) -> Iterator[None]:
        """A first Ctrl-C / SIGINT asks the loop to stop between meta-iterations; a second one
        interrupts at once.

        A stop in the middle of an optimiser step could leave θ and Adam's moments out of step;
        between iterations last.npz is saved and the run resumes exactly. Only the main thread
        can own signal handlers, and in a multi-process run one process stopping alone would
        leave the others waiting in an all-reduce, so there Ctrl-C keeps its immediate effect.
        """
        if (
            threading.current_thread() is not threading.main_thread()
            or distributed.world_size() > 1
        ):
            yield
            return

        def request_stop(signum, frame) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt(f"at once during iteration {self.state.iteration + 1}")
            self.stop_requested = True
            self._say("interrupt: stopping after this meta-iteration (interrupt again to stop now)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- the loop --------------------------------------------------------------------------------
    def _train(self) -> TrainState:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            write_json(self.run_dir / "config.json", self._describe_run())
        budget = config.get("max_minutes")
        progress = tqdm(
            total=config["epochs"],
            initial=self.state.iteration,
            desc=config["run_name"],
            unit="it",
            dynamic_ncols=True,
            disable=not distributed.is_main(),
        )
        # The budget is wall time, validations and checkpoints included (budget_spent).
        resumed_at, loop_started = self.state.elapsed_seconds, time.perf_counter()
        validation_seconds = 0.0
        while self.state.iteration < config["epochs"]:
            step_started = time.perf_counter()
            self._meta_step()
            progress.update(1)
            iteration = self.state.iteration
            now = time.perf_counter()
            self.state.elapsed_seconds = resumed_at + now - loop_started
            out_of_time = budget is not None and budget_spent(
                self.state.elapsed_seconds, now - step_started, validation_seconds, budget
            )
            last = iteration == config["epochs"] or out_of_time
            if iteration % config["val_every"] == 0 or last:
                validation_started = time.perf_counter()
                self._validate()
                validation_seconds = time.perf_counter() - validation_started
            if (
                iteration % config["ckpt_every"] == 0
                or iteration % config["val_every"] == 0
                or last
            ):
                self.state.elapsed_seconds = resumed_at + time.perf_counter() - loop_started
                self._save_last()
            if self.recorder is not None:  # run record: new entries, heartbeat every few seconds
                self.recorder.progress(self.state)
            if out_of_time:
                self._say(f"time budget of {budget} min reached at iteration {iteration}")
                break
            if self.stop_requested and not last:
                progress.close()
                self._save_last()
                raise KeyboardInterrupt(
                    f"at iteration {iteration}; last.npz kept: python train.py --resume "
                    f"{self.run_dir}"
                )
        progress.close()
        metric = self.problem.net.metric
        if self.state.best_score is None:  # resumed at its last iteration: nothing was run
            return self.state
        self._say(
            f"best validation {metric.name}: {metric.format(self.state.best_score)} "
            f"(iteration {self.state.best_iteration}); run folder: {self.run_dir}"
        )
        return self.state

    def _meta_step(self) -> None:
        config, state = self.config, self.state
        iteration = state.iteration + 1
        track = iteration % config["log_every"] == 0 or iteration == 1
        sampler = self.problem.samplers["train"]
        tasks = [
            sampler.sample(config["seed"], "train", iteration, index)
            for index in distributed.my_share(config["task_num"])
        ]
        try:
            loss, per_step = self.learner.meta_update(
                tasks,
                self.optimizer,
                config["task_num"],
                track,
                distributed.sum_over_processes,
                iteration=iteration,
            )
        except NonFiniteError as error:
            raise UserError(
                f"{error} at iteration {iteration}; training stopped. "
                f"The last good checkpoint is {self.run_dir / 'last.npz'}"
            ) from None
        state.iteration = iteration
        if track:
            per_step = [round(value, 4) for value in per_step]
            state.log.append(
                {
                    "iteration": iteration,
                    "loss": loss,
                    "query_per_step": per_step,
                    "elapsed": round(state.elapsed_seconds, 2),
                }
            )
            self._say(
                f"it {iteration}: meta-loss {loss:.4f}  query {self.problem.net.metric.name} "
                f"per inner step {per_step}"
            )

    def _validate(self) -> None:
        config = self.config
        sampler = self.problem.samplers["val"]
        tasks = [
            sampler.sample(config["seed"], "val", 0, index)
            for index in distributed.my_share(config["val_tasks"])
        ]
        per_task = self.learner.evaluate(tasks, config["glob_update_step_test"])
        per_step = distributed.gather_rows(per_task).mean(axis=0)
        score = float(per_step[-1])
        state = self.state
        state.validation.append(
            {
                "iteration": state.iteration,
                "per_step": per_step.round(4).tolist(),
                "elapsed": round(state.elapsed_seconds, 2),
            }
        )
        metric = self.problem.net.metric
        better = metric.better(score, state.best_score)
        if better:
            state.best_score, state.best_iteration = score, state.iteration
            self._save_best()
        self._say(
            f"validation at it {state.iteration}: {metric.name} "
            f"{metric.format(score)} after {config['glob_update_step_test']} steps"
            f"{' (best so far)' if better else ''}"
        )

    def _say(self, line: str) -> None:
        """Print above the progress bar, from the first process only."""
        if distributed.is_main():
            tqdm.write(line)

    # -- files -----------------------------------------------------------------------------------
    def _theta(self) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self.params.items()}

    def _meta(self) -> dict:
        return {
            "network": self.problem.net.config(),
            "algo": self.config["algo"],
            "config": self.config,
            "state": asdict(self.state),
        }

    def _save_best(self) -> None:
        if not distributed.is_main():
            return
        theta = self._theta()
        save_checkpoint(self.run_dir / "best.npz", Checkpoint(theta, self._meta()))
        if self.config.get("export_pkl"):
            export_legacy_pkl(self.run_dir / "best.pkl", {k: theta[k] for k in self.learner.theta})

    def _save_last(self) -> None:
        if not distributed.is_main():
            return
        optimizer = self.optimizer.state_dict()
        save_checkpoint(
            self.run_dir / "last.npz", Checkpoint(self._theta(), self._meta(), optimizer)
        )

    def _describe_run(self) -> dict:
        return {
            **self.config,
            "network": self.problem.net.config(),
            "paddle_version": paddle.__version__,
            "device": self.device,
            "data_manifest_sha256": data_manifest_sha256(self.config),
        }


def data_manifest_sha256(config: dict) -> str | None:
    """sha256 of the manifest of the image data a run uses (None for sinusoids or no manifest)."""
    if config["dataset"] == "omniglot":
        return omniglot.manifest_sha256(config["data_dir"])
    if config["dataset"] == "folder":
        path = Path(config["data_dir"]) / folders.manifest_name(config["data"])
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return None


def budget_spent(
    elapsed_seconds: float, step_seconds: float, validation_seconds: float, minutes: float
) -> bool:
    """Whether a wall-time budget of ``minutes`` (validations included) is used up: one more
    meta-iteration as long as the last and the final validation as long as the last one would
    not fit, so the run ends validated within it."""
    return elapsed_seconds + step_seconds + validation_seconds >= minutes * 60


def train(given: dict) -> TrainState:
    """Entry point for train.py: resolve the flags, then run (or continue) one training run."""
    flags = {key: value for key, value in given.items() if key != "force"}
    force = bool(given.get("force"))
    if force and not flags.get("resume"):
        raise UserError("--force only applies with --resume")
    return Trainer(prepare_config(flags), force=force).run()
