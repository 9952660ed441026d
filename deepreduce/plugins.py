"""Hooks that upper layers fill, so that `deepreduce` never imports them (the layers run one way).

Two entry-point groups, declared in the installing package's pyproject.toml:

    deepreduce.commands   register(subparsers): adds `deepreduce` subcommands (the secure layer adds
                          export, predict and bench)
    deepreduce.latency    measure(checkpoint_path, pixels) -> {"latency_s", "mb", "rounds",
                          "latency_images"}: the private-inference cost behind
                          `deepreduce frontier --measure-latency`; `pixels` are uint8 N x C x H x W
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from .errors import UserError

COMMANDS = "deepreduce.commands"
LATENCY = "deepreduce.latency"


def command_plugins() -> list[Callable]:
    """Every installed `deepreduce.commands` hook, in name order (a stable help listing). One that cannot
    be imported is left out with a warning: the method's own commands work without the upper layers."""
    hooks = []
    for ep in sorted(entry_points(group=COMMANDS), key=lambda ep: ep.name):
        try:
            hooks.append(ep.load())
        except ImportError as exc:
            print(f"warning: the {ep.name!r} commands ({ep.value}) are unavailable: {exc}", file=sys.stderr)
    return hooks


def latency_measurer() -> Callable:
    """The installed `deepreduce.latency` hook, or a UserError naming what is missing."""
    found = list(entry_points(group=LATENCY))
    if not found:
        raise UserError("--measure-latency needs the secure runtime, and no `deepreduce.latency` plugin is "
                        "installed: install this project (`make install`, or `pip install -e .`)")
    try:
        return found[0].load()
    except ImportError as exc:
        raise UserError(f"--measure-latency needs the secure runtime ({found[0].value}), which cannot be "
                        f"imported here ({exc}): install the project with its dependencies (`make install`)") from None
