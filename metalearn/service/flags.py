"""train.py's flags over HTTP: described for the form, and JSON turned into a validated argv.

The argv is parsed by train.py's own parser and checked by the same functions as the command
line (``prepare_config``), so the service refuses exactly what train.py refuses and a job runs
exactly what a person could type.

A client's own network comes as data: ``"model"``, a JSON model spec (metalearn/nets/spec.py),
which the service validates and writes to the run's folder for ``--net``. ``"net"`` itself only
names a built-in network: a request never makes the service import code or read a path it names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

from metalearn.errors import UserError
from metalearn.nets.spec import parse_spec
from metalearn.service.errors import field_of, invalid
from metalearn.training.config import (
    COMMON_DEFAULTS,
    DEFAULTS,
    NETS,
    check_model_spec,
    train_parser,
)
from metalearn.training.trainer import prepare_config

# Flags that belong to the server or to other endpoints, never to a client's training request.
REFUSED = {
    "resume": "resume a run with POST /api/runs/{name}/resume",
    "work_dir": "the server decides where runs live (serve.py --work_dir)",
    "data_dir": "the server decides where the data is (serve.py --data_dir)",
}
MODEL = "model"
"""The request field holding a client's own network as a JSON model spec."""


def _actions() -> Iterator[argparse.Action]:
    for action in train_parser()._actions:
        if action.option_strings and action.dest != "help" and action.dest not in REFUSED:
            yield action


def _kind(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return "bool"
    return {int: "int", float: "float"}.get(action.type, "str")


def _default(dataset: str, name: str):
    if name == "dataset":
        return dataset
    value = {**COMMON_DEFAULTS, **DEFAULTS[dataset]}.get(name)
    if name == "k_query" and value is None:
        return "k_spt"  # sinusoid: as many query points as support points
    return value


def _choices(action: argparse.Action) -> list | None:
    if action.dest == "net":  # by name, only the built-in networks (see MODEL)
        return list(NETS)
    return list(action.choices) if action.choices else None


def describe_flags() -> list[dict]:
    """Every flag a client may send: type, defaults per dataset, choices, help."""
    return [
        {
            "name": action.dest,
            "type": _kind(action),
            "default": _default("omniglot", action.dest),
            "defaults": {dataset: _default(dataset, action.dest) for dataset in DEFAULTS},
            "choices": _choices(action),
            "help": action.help,
        }
        for action in _actions()
    ]


def training_argv(body: dict) -> list[str]:
    """train.py arguments (``--flag=value``) for a JSON object of flags; unknown keys are refused."""
    kinds = {action.dest: _kind(action) for action in _actions()}
    switchable = {a.dest for a in _actions() if isinstance(a, argparse.BooleanOptionalAction)}
    argv = []
    for key, value in body.items():
        if key in REFUSED:
            raise invalid(f"--{key} cannot be set here: {REFUSED[key]}", key)
        if key not in kinds:
            raise invalid(f"unknown flag {str(key)[:64]!r}: see GET /api/flags", str(key)[:64])
        if value is None:
            continue
        if kinds[key] == "bool":
            if not isinstance(value, bool):
                raise invalid(f"--{key} is a switch: send true or false", key)
            if value:
                argv.append(f"--{key}")
            elif key in switchable:  # off even where a preset (--algo maml++) turns it on
                argv.append(f"--no-{key}")
        elif isinstance(value, (bool, list, dict)):
            raise invalid(f"--{key} takes one {kinds[key]} value, got {value!r:.64}", key)
        else:
            argv.append(f"--{key}={value}")
    return argv


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message)


def parse_train_argv(argv: list[str]) -> dict:
    """train.py's parser on ``argv``, raising UserError instead of printing usage and exiting."""
    parser = train_parser()
    parser.__class__ = _RaisingParser  # report instead of printing usage and exiting
    return vars(parser.parse_args(argv))


def validate_training(
    body: dict, work_dir: str, data_dir: str
) -> tuple[dict, list[str], dict | None]:
    """(resolved config, argv without folders, the normalised model spec or None) for a training
    request, or a 422 naming the flag or field."""
    flags = {key: value for key, value in body.items() if key != MODEL}
    spec = model_spec(body.get(MODEL), flags.get("net"))
    argv = training_argv(flags)
    try:
        given = parse_train_argv(argv)
        config = prepare_config({**given, "work_dir": work_dir, "data_dir": data_dir})
    except UserError as error:
        raise invalid(str(error), field_of(str(error))) from None
    if spec is not None:
        try:
            check_model_spec(spec, config, MODEL)
        except UserError as error:
            raise invalid(str(error), MODEL) from None
    return config, argv, spec


def model_spec(model: object, net: object) -> dict | None:
    """The request's model spec, validated and normalised (or None), or a 422. ``net`` may only
    name a built-in network: a module path or a file name from a client is never used."""
    if isinstance(net, str) and net not in NETS:
        raise invalid(
            f"--net {net[:64]!r}: the service takes only {' or '.join(NETS)} by name; send your "
            f'own network as a JSON model spec in "{MODEL}"',
            "net",
        )
    if model is None:
        return None
    if net is not None:
        raise invalid(f'send "net" (a built-in network) or "{MODEL}" (your own), not both', MODEL)
    try:
        return parse_spec(json.dumps(model), MODEL)
    except UserError as error:
        raise invalid(str(error), MODEL) from None
