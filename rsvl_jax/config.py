"""Experiment configs: `configs/<file>.py[:k=v,flag]` plus `--config.a.b=value` overrides.

An experiment file is plain Python defining `get_config(arg: str | None) -> ConfigDict`
(big_vision style). `arg` is one comma-separated string that the file turns into typed
values with `parse_arg`. Everything that reaches the trainer goes through `load_config`,
which applies command-line overrides with the type of the existing field and locks the
result, so a typo anywhere (command line, config file, code) is an error, never a silently
ignored setting.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from rsvl_jax.errors import UserError

ConfigDict = ml_collections.ConfigDict

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class ConfigError(UserError, ValueError):
    """A bad config file, argument or override; the message names the key and the file."""


def _convert(text: str, like: Any) -> Any:
    """Turns `text` into a value of the type of `like`; raises ValueError when it cannot."""
    if isinstance(like, bool):  # before int: bool is an int subclass
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, str):
        return text
    if isinstance(like, (tuple, list, dict)):
        value = ast.literal_eval(text)
        if isinstance(like, dict):
            if not isinstance(value, dict):
                raise ValueError
            return value
        if not isinstance(value, (tuple, list)):
            value = (value,)  # `a=3` for a tuple field means a 1-tuple
        return type(like)(value)
    if like is None:  # an unset field takes any literal; anything else stays a string
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ValueError


def _type_name(like: Any) -> str:
    return "None (any literal)" if like is None else type(like).__name__


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses `"a=1,b=x,flag"` into a ConfigDict typed like `defaults`.

    A bare `flag` means `flag=True` and is only allowed for bool defaults. A name not among
    the defaults raises ConfigError (`load_config` adds the config file to the message).
    Values cannot contain commas; use a `--config.a.b=(1,2)` override for tuples.
    """
    result = ConfigDict(dict(defaults))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, has_value, text = item.partition("=")
        name = name.strip()
        if name not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ConfigError(f"unknown config argument {name!r} (known: {known})")
        like = defaults[name]
        if not has_value:
            if not isinstance(like, bool):
                raise ConfigError(f"config argument {name!r} needs a value ({_type_name(like)})")
            result[name] = True
            continue
        try:
            result[name] = _convert(text.strip(), like)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"config argument {name!r}: expected {_type_name(like)}, got {text!r}") from None
    return result


def _split_spec(spec: str) -> tuple[pathlib.Path, str | None]:
    """`dir/x.py:a=1` -> (path, "a=1"); a spec with no `.py:` is all path."""
    if ".py:" in spec:
        path, _, arg = spec.partition(".py:")
        return pathlib.Path(path + ".py"), arg
    return pathlib.Path(spec), None


def _import_file(path: pathlib.Path):
    """Imports a config file by path under a private module name (no sys.path changes)."""
    name = f"_rsvl_config_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # lets dataclasses/pickling inside the file find the module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


def apply_override(config: ConfigDict, override: str, source: str = "<config>") -> None:
    """Applies one `--config.a.b=value` (or `a.b=value`) override in place."""
    text = override
    for prefix in ("--config.", "config."):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    key, has_value, value_text = text.partition("=")
    if not has_value or not key:
        raise ConfigError(f"override {override!r} must look like --config.a.b=value ({source})")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {key!r} in override {override!r} "
                              f"(no field {'.'.join(parts[:i + 1])!r} in {source})")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    like = node[leaf]
    if isinstance(like, ConfigDict):
        raise ConfigError(f"config key {key!r} is a group of settings in {source}; "
                          "override its fields one by one")
    try:
        value = _convert(value_text, like)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config key {key!r}: expected {_type_name(like)}, got {value_text!r} "
                          f"(in {source})") from None
    try:
        node[leaf] = value
    except TypeError as e:  # ml_collections' own type check, as a last line of defence
        raise ConfigError(f"config key {key!r}: {e} (in {source})") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path/to/file.py[:args]`, applies `overrides`, and returns the locked config."""
    path, arg = _split_spec(spec)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    module = _import_file(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg)
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config in {path} returned {type(config).__name__}, "
                          "expected ml_collections.ConfigDict")
    for override in overrides:
        apply_override(config, override, source=str(path))
    config.lock()
    return config


def parse_cli(argv: Sequence[str]) -> tuple[ConfigDict, list[str]]:
    """Pulls `--config SPEC` (or `--config=SPEC`) and `--config.a.b=v` out of `argv`.

    Returns the loaded config and the arguments it did not consume, in order.
    """
    spec, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a value: --config configs/x.py[:args]")
            spec = args[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            spec = a[len("--config="):]
        elif a.startswith("--config."):
            overrides.append(a)
        else:
            rest.append(a)
        i += 1
    if spec is None:
        raise ConfigError("missing --config configs/<file>.py[:args]")
    return load_config(spec, overrides), rest


# ---------------------------------------------------------------------------------------
# Checks a task runs on its settings, and the entry points' --help
# ---------------------------------------------------------------------------------------
def repo_path(path: str) -> str:
    """Paths in configs may be relative to the working directory or to the repository
    (`data/synthetic_vocab` works from anywhere)."""
    if path and not os.path.exists(path) and (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    return path


def get_key(config: ConfigDict, key: str) -> Any:
    """`config` at the dotted `key`; a missing key is a ConfigError naming it."""
    node = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            raise ConfigError(f"the config has no key {key!r}")
        node = node[part]
    return node


def check_choice(config: ConfigDict, key: str, choices) -> None:
    """Raises naming `key` and the accepted values when the setting is not one of them."""
    value = get_key(config, key)
    if value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"config key {key!r} is {value!r}; accepted values: {accepted}")


def check_paths(config: ConfigDict, *keys: str) -> None:
    """Path settings must be strings (or unset): `--config.data.manual_dir=5` is a mistake."""
    for key in keys:
        value = get_key(config, key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a path (a string), got {value!r}")


CONFIG_HELP = """\
configuration:
  --config FILE.py[:ARGS]   an experiment file; ARGS is one comma-separated string of the
                            file's arguments, e.g. configs/pir.py:dataset=rsicd,baseline
                            (a bare name sets a flag to True)
  --config.a.b=VALUE        override any field; the value is parsed as the field's type
                            (ints, floats, true/false, tuples like "(16,32)", strings)
  An unknown key, argument or wrongly typed value is an error that names it.
  With --config and --help the resolved configuration is printed as well."""


def print_help(parser, argv: Sequence[str]) -> None:
    """argparse's help, how configs work, and the resolved config when `--config` is given."""
    parser.print_help()
    print()
    print(CONFIG_HELP)
    argv = [a for a in argv if a not in ("-h", "--help")]
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        config, _ = parse_cli(argv)
        print("\nresolved configuration:")
        print(config.to_yaml() if hasattr(config, "to_yaml") else str(config))
