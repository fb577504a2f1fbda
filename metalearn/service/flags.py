"""train.py's flags over HTTP: described for the form, and JSON turned into a validated argv.

The argv is parsed by train.py's own parser and checked by the same functions as the command
line (``prepare_config``), so the service refuses exactly what train.py refuses and a job runs
exactly what a person could type.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from metalearn.errors import UserError
from metalearn.service.errors import field_of, invalid
from metalearn.training.config import COMMON_DEFAULTS, DEFAULTS, NETS, train_parser
from metalearn.training.trainer import prepare_config

# Flags that belong to the server or to other endpoints, never to a client's training request.
REFUSED = {
    "resume": "resume a run with POST /api/runs/{name}/resume",
    "work_dir": "the server decides where runs live (serve.py --work_dir)",
    "data_dir": "the server decides where the data is (serve.py --data_dir)",
}
# What a client may choose where train.py takes more: --net MODULE:FUNCTION imports Python code,
# which only the command line may ask for.
CLIENT_CHOICES = {"net": NETS}


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


def describe_flags() -> list[dict]:
    """Every flag a client may send: type, defaults per dataset, choices, help."""
    return [
        {
            "name": action.dest,
            "type": _kind(action),
            "default": _default("omniglot", action.dest),
            "defaults": {dataset: _default(dataset, action.dest) for dataset in DEFAULTS},
            "choices": list(_choices(action) or []) or None,
            "help": action.help,
        }
        for action in _actions()
    ]


def _choices(action: argparse.Action):
    return CLIENT_CHOICES.get(action.dest, action.choices)


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
        if key in CLIENT_CHOICES and value not in CLIENT_CHOICES[key]:
            raise invalid(
                f"--{key} takes one of {', '.join(CLIENT_CHOICES[key])} here (a MODULE:FUNCTION "
                "model imports Python code: start it with train.py on the server)",
                key,
            )
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


def validate_training(body: dict, work_dir: str, data_dir: str) -> tuple[dict, list[str]]:
    """(resolved config, argv without folders) for a training request, or a 422 naming the flag."""
    argv = training_argv(body)
    try:
        given = parse_train_argv(argv)
        config = prepare_config({**given, "work_dir": work_dir, "data_dir": data_dir})
    except UserError as error:
        raise invalid(str(error), field_of(str(error))) from None
    return config, argv
