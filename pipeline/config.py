"""YAML experiment configs feeding click: `--config x.yaml` sets defaults, the command line overrides them.

A config holds options shared by every stage at the top level and per-stage sections keyed by command name:

    dataset: digits          # any stage with a --dataset option takes it
    teach:
      epochs: 15             # only `kdpipe teach` takes this
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise click.BadParameter(f"cannot read {path}: {err.strerror}", param_hint="--config") from err
    except yaml.YAMLError as err:
        raise click.BadParameter(f"{path} is not valid YAML: {str(err).splitlines()[0]}", param_hint="--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of options", param_hint="--config")
    return data


def defaults_for(command: click.Command, config: dict[str, Any], sections: set[str], path: str) -> dict[str, Any]:
    """The config's defaults for one command: shared keys it accepts, then its own section.

    Unknown keys in the command's section are errors; a top-level key that is neither a section nor an option
    of some command is a typo and also an error.
    """
    names = {p.name for p in command.params if p.name and p.name != "config"}
    section = config.get(command.name) or {}
    if not isinstance(section, dict):
        raise click.BadParameter(f"{path}: section {command.name!r} must be a mapping", param_hint="--config")
    unknown = sorted(k.replace("-", "_") for k in section if k.replace("-", "_") not in names)
    if unknown:
        raise click.BadParameter(f"{path}: `{command.name}` has no option {unknown[0]!r}", param_hint="--config")
    defaults = {k.replace("-", "_"): v for k, v in config.items() if k not in sections and k.replace("-", "_") in names}
    defaults.update({k.replace("-", "_"): v for k, v in section.items()})
    return defaults


def config_option(command: click.Command) -> click.Command:
    """Adds `--config FILE` to a command; eager, so its values become defaults before other options parse."""

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        config = load_config(value)
        group = ctx.parent.command if ctx.parent else None
        commands = getattr(group, "commands", {}) if group else {}
        all_options = {p.name for c in commands.values() for p in c.params}
        typos = sorted(k for k in config if k not in commands and k.replace("-", "_") not in all_options)
        if typos:
            raise click.BadParameter(f"{value}: unknown key {typos[0]!r}", param_hint="--config")
        ctx.default_map = {**(ctx.default_map or {}), **defaults_for(command, config, set(commands), value)}
        return value

    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=True,
        callback=load,
        help="YAML file of defaults (top-level shared keys, or a section per command); flags override it.",
    )(command)
