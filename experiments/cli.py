"""How every binary reports an error: one line `error: <what>` on stderr (the message names where: the flag, the
config field, the record, the file) and a non-zero exit; its traceback only with --verbose (a flag of every
binary: importing this module defines it).

    from experiments import cli
    ...
    if __name__ == "__main__":
        cli.run(main)  # in place of absl's app.run(main)

Exit codes: 2 for a usage error (an unknown flag or config field, a flag value that does not parse, a missing
required flag, `app.UsageError`), 1 for an error while running (a bad data record, a damaged checkpoint, ...).
An unknown `--config.x` names the closest fields of the config (difflib).
"""

from __future__ import annotations

import difflib
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from ml_collections import ConfigDict
from ml_collections.config_flags import config_path
from ml_collections.config_flags.config_flags import ConfigFileFlagParser
from tqdm import tqdm

USAGE_ERROR = 2
RUN_ERROR = 1
# errors whose message is written for a reader (the project's own errors derive from these); any other type is
# shown with its name and the line that raised it, e.g. "KeyError: 'x' (raised at qwen3vl_jax/.../file.py:12)"
READABLE_ERRORS = (ValueError, OSError, RuntimeError)

_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print its traceback above the one-line message.")


def run(main: Callable[[list[str]], Any]) -> None:
    """absl's `app.run(main)`, with every error reported as one line (see the module docstring)."""
    app.run(_reporting_errors(main), flags_parser=_parse_flags)


def _reporting_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    def wrapped(argv: list[str]) -> Any:
        try:
            return main(argv)
        except (SystemExit, KeyboardInterrupt):
            raise
        except (app.UsageError, flags.Error) as e:
            fail(e, exit_code=USAGE_ERROR, verbose=_VERBOSE.value)
        except Exception as e:
            fail(e, exit_code=RUN_ERROR, verbose=_VERBOSE.value)

    return wrapped


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (the arguments left after the flags), an error in it reported as a usage error."""
    try:
        remaining = flags.FLAGS(argv)
        for flag in _config_flags():
            if flag.value is not None:
                flag.value.get("")  # a config file that did not load raises its error on any use
        return remaining
    except Exception as e:
        verbose = _verbose_in(argv)
        unknown = unknown_config_field(argv)
        if unknown is not None:
            fail(e, exit_code=USAGE_ERROR, verbose=verbose, message=unknown)
        fail(e, exit_code=USAGE_ERROR, verbose=verbose)


def _verbose_in(argv: Sequence[str]) -> bool:
    """Whether --verbose is among the flags of `argv` (read by hand: the flags failed to parse)."""
    for argument in argv[1:]:
        if argument == "--":
            break
        if argument in ("--verbose", "-verbose") or argument.lower() in ("--verbose=true", "--verbose=1"):
            return True
    return False


def fail(error: BaseException, *, exit_code: int, verbose: bool, message: str | None = None) -> NoReturn:
    """Prints `error` as one line `error: ...` on stderr (its traceback above it when `verbose`) and exits."""
    if verbose:
        traceback.print_exception(error)
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open: its last state, then the line
        bar.close()
    print(f"error: {message or describe(error)}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def describe(error: BaseException) -> str:
    """One line for `error`: its message (its lines joined), preceded by its type and followed by where it was
    raised when the type is not one whose message is written for a reader (READABLE_ERRORS, absl's flag and
    usage errors)."""
    text = one_line(str(error))
    if isinstance(error, (*READABLE_ERRORS, app.UsageError, flags.Error)) and text:
        return text
    where = ""
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        frame = frames[-1]
        where = f" (raised at {_short_path(frame.filename)}:{frame.lineno} in {frame.name}; --verbose: the traceback)"
    return f"{type(error).__name__}: {text or '(no message)'}{where}"


def one_line(message: str) -> str:
    """The lines of `message` joined into one: after a line that ends a clause (. : ; ,) with a space, else with
    "; " (a multi-line message lists its items on lines of their own)."""
    text = ""
    for line in (line.strip() for line in message.splitlines()):
        if line:
            text += ("" if not text else " " if text.endswith((".", ":", ";", ",")) else "; ") + line
    return text


def _short_path(filename: str) -> str:
    for package in ("qwen3vl_jax/", "experiments/", "site-packages/"):
        if package in filename:
            return package.removeprefix("site-packages/") + filename.rsplit(package, 1)[1]
    return filename


# ------------------------------------------------------------------------------------------ unknown config fields


def unknown_config_field(argv: Sequence[str]) -> str | None:
    """For the first `--<config flag>.<path>=...` of `argv` whose path is not a field of that config (as loaded
    from its file), "unknown config field <path> in <file>; did you mean: <closest fields>"; None when every
    override names a field (or the config file does not load)."""
    for flag in _config_flags():
        file = _config_file(flag, argv)
        if file is None:
            continue
        try:
            config = flag.parser.parse(file)
        except Exception:  # the file does not load: the error itself says why
            return None
        if not isinstance(config, ConfigDict):
            return None
        for path in _override_paths(flag.name, argv):
            missing = _first_missing(config, path)
            if missing is not None:
                return f"unknown config field {missing} in --{flag.name}={file}; {_suggestions(missing, config)}"
    return None


def _suggestions(missing: str, config: ConfigDict) -> str:
    """The fields closest to the dotted path `missing`: siblings of a similar name and fields elsewhere of the
    same name (a field given at the wrong level), else fields elsewhere of a similar name, else all siblings."""
    fields = flattened_field_names(config)
    parent, _, last = missing.rpartition(".")
    siblings = {field.rpartition(".")[2]: field for field in fields if field.rpartition(".")[0] == parent}
    close = [siblings[name] for name in difflib.get_close_matches(last, list(siblings), n=3, cutoff=0.6)]
    close += [field for field in fields if field.rpartition(".")[2] == last and field not in close]
    if not close:
        names = difflib.get_close_matches(last, sorted({field.rpartition(".")[2] for field in fields}), n=3)
        close = [field for field in fields if field.rpartition(".")[2] in names]
    if close:
        return f"did you mean: {', '.join(close[:5])}"
    return f"the fields {'of ' + parent if parent else 'at the top'} are: {', '.join(siblings.values())}"


def _config_flags() -> list[flags.Flag]:
    """The flags defined by ml_collections' DEFINE_config_file."""
    found = {name: flags.FLAGS[name] for name in flags.FLAGS}
    return [flag for name, flag in found.items() if name == flag.name and isinstance(flag.parser, ConfigFileFlagParser)]


def _config_file(flag: flags.Flag, argv: Sequence[str]) -> str | None:
    """The value of --<flag.name> in argv, else the flag's default file (None: none)."""
    default = getattr(flag, "default_unparsed", None)
    value = default if isinstance(default, str) else None
    for i, argument in enumerate(argv):
        if argument == "--":
            break
        match = re.fullmatch(rf"--?{flag.name}(=(.*))?", argument)
        if match:
            value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else value)
    return value


def _override_paths(name: str, argv: Sequence[str]) -> list[str]:
    """The field paths of the `--<name>.<path>[=value]` (or `--no<name>.<path>`) arguments, in order."""
    paths = []
    for argument in argv:
        if argument == "--":
            break
        match = re.match(rf"--?(?:no)?{name}\.([^=]+)", argument)
        if match:
            paths.append(match.group(1))
    return paths


def _first_missing(config: ConfigDict, path: str) -> str | None:
    """The shortest prefix of the dotted `path` that is not a field of `config` (None: the whole path is one, or
    it leads into a field holding None, which an override may fill)."""
    parts = path.split(".")
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        try:
            value = config_path.get_value(prefix, config)
        except (AttributeError, KeyError, IndexError, ValueError):
            return prefix
        if value is None:
            return None
    return None


def flattened_field_names(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every field of `config` by its dotted path, nested ConfigDicts and their fields alike ("optimizer",
    "optimizer.lr", ...)."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, (ConfigDict, dict)):
            names += flattened_field_names(value if isinstance(value, ConfigDict) else ConfigDict(value), f"{name}.")
    return names
