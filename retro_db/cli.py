"""What every command line of the project shares: flags derived from config dataclasses, and user
errors that end in one line naming what is missing and which command makes it (never a traceback).

A config field becomes ``--field-name`` (or the name given in ``flags``) with the field's type and
default; ``metadata={"help": ..., "choices": ...}`` on a dataclass field (or a pydantic field's
``description``, for the service's typed Serve config) documents it. The dataclass stays
the one place a setting is declared, and the checkpoint or manifest records exactly what was run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from retro_db.manifest import DBNotReady

# Errors a user can fix (a missing DB or run, a config refused, bad input): their message is the
# whole story. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DBNotReady, FileNotFoundError, ValueError)


def _fields(cls) -> list[tuple[str, object, str, tuple | None]]:
    """(name, default, help, choices) of each field of a dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        return [
            (
                f.name,
                f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                f.metadata.get("help", ""),
                f.metadata.get("choices"),
            )
            for f in dataclasses.fields(cls)
        ]
    return [
        (name, f.get_default(call_default_factory=True), f.description or "", None)
        for name, f in cls.model_fields.items()
    ]


def add_config_flags(parser: argparse.ArgumentParser, cls, *, flags: dict[str, str] | None = None, skip=()) -> None:
    """One flag per field of ``cls``; values land in ``args`` under ``<Class>.<field>``."""
    flags = flags or {}
    group = parser.add_argument_group(cls.__name__)
    for name, default, help_text, choices in _fields(cls):
        if name in skip:
            continue
        kind = type(default)
        help_text = help_text.replace("%", "%%")
        options = {
            "dest": f"{cls.__name__}.{name}",
            "default": default,
            "help": f"{help_text} (default: %(default)s)" if help_text else "default: %(default)s",
        }
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=kind, choices=choices, metavar=None if choices else kind.__name__.upper())
        group.add_argument("--" + flags.get(name, name.replace("_", "-")), **options)


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """``cls`` built from the flags ``add_config_flags`` added (skipped fields keep their defaults)."""
    values = {
        name: getattr(args, f"{cls.__name__}.{name}")
        for name, *_ in _fields(cls)
        if hasattr(args, f"{cls.__name__}.{name}")
    }
    return cls(**{**values, **overrides})


def run(main: Callable[[], int | None], logger: str, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
    """Runs a CLI's ``main``; a user error is logged as one line and exits 2."""
    try:
        code = main()
    except errors as e:
        logging.getLogger(logger).error("%s", e)
        sys.exit(2)
    sys.exit(code or 0)
