"""One config system for train, eval, serve and bench: typed dataclasses, YAML files, command-line
overrides; and the table of the environment variables themis_engine reads (ENVIRONMENT).

A config is a dataclass whose fields are plain values or nested dataclasses (sections). Each field
carries its help text (`option(default, "help")`), which `--help` prints. From the command line:

    --config FILE.yaml          a YAML (or JSON) mapping, sections as nested mappings
    --preset NAME               a built-in mapping (applied before --config and the overrides)
    --section.key=value         override one field (also `--section.key value`); a top-level field
    --key=value / --some-flag   is `--key`, with dashes or underscores; a bool flag alone means true
    --debug                     on an error, also print the Python traceback (or THEMIS_DEBUG=1)

Values are converted to the field's type (int, float, bool, str, Optional[...], list/tuple of
those, Literal[...] choices; a list or mapping is YAML flow or JSON text, `{chosen: better}`); an
unknown key, a bad value or a choice not allowed is an error that names the key. A config's
`check()` method (where it has one) checks the values together (ranges, sizes that must divide).

The entry points run through `run_cli`: a user error (any themis_engine.errors.ThemisError, an
OSError) is one line on stderr, `PROG: error: ...`, and exit status 2, with no traceback unless
`--debug` is given or THEMIS_DEBUG=1; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, get_args, get_origin

from themis_engine.errors import ConfigError, ThemisError


def option(default: Any = dataclasses.MISSING, help: str = "", *, positional: bool = False, factory=None):
    """A config field with its help text. positional=True: given without a flag (e.g. eval's MODEL)."""
    meta = {"help": help, "positional": positional}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls):
    """A nested section field, default-constructed."""
    return dataclasses.field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip().split("\n")[0]})


# ------------------------------------------------------------------------------------------ types
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to type `tp`; ConfigError names `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in get_args(tp):
                return None
        errors = []
        for a in args:
            try:
                return convert(value, a, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                items = parse_flow(text, key, "a list such as [a, b] (or a, b)")
                if not isinstance(items, list):
                    raise ConfigError(f"{key}: expected a list such as [a, b], got {value!r}")
            else:
                items = [v for v in text.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        out = [convert(v.strip() if isinstance(v, str) else v, inner, key) for v in items]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = parse_flow(value, key, "a mapping such as {a: 1, b: 2}") if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            if tp is int:
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type):
        return tp(value)
    return value


def parse_flow(text: str, key: str, expected: str) -> Any:
    """A command-line list or mapping: YAML flow (`{chosen: better, rejected: worse}`, `[0.9, 0.95]`)
    or JSON (a subset of YAML). ConfigError names `key`, what was expected and where the text fails."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at character {mark.index + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{key}: cannot read {text!r}{at} ({problem}); expected {expected}") from None


# ------------------------------------------------------------------------------------------ checks
def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """ConfigError naming `key` and `value` unless value is a finite number in the range
    (low_open / high_open: the bound itself is excluded)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer and ok:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    kind = "a whole number" if integer else "a finite number"
    if low is not None and high is not None:
        expected = (f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    elif low is not None:
        expected = f"{kind} {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        expected = f"{kind} {'<' if high_open else '<='} {high:g}"
    else:
        expected = kind
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


# ------------------------------------------------------------------------------------------ merge
def apply(cfg: Any, mapping: dict, prefix: str = "") -> Any:
    """Set fields of `cfg` (in place) from a nested mapping; unknown keys are errors."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(mapping).__name__}")
    hints = _hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for raw_key, value in mapping.items():
        name = str(raw_key).replace("-", "_")
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; known here: {', '.join(sorted(names))}")
        tp = hints[name]
        if _is_section(tp):
            apply(getattr(cfg, name), value, prefix=key + ".")
        else:
            setattr(cfg, name, convert(value, tp, key))
    return cfg


def set_path(cfg: Any, dotted: str, value: Any) -> None:
    """Set one field by its dotted key (`optim.lr`), converting `value` to the field's type."""
    parts = dotted.replace("-", "_").split(".")
    mapping: dict = {}
    cur = mapping
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    apply(cfg, mapping)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_file(path: str | Path) -> dict:
    """A YAML (or .json) config file as a mapping; ConfigError names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}, line {line} (byte {err.start}): not UTF-8 text ({err.reason})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not a config (nested too deeply)") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None))))
            raise ConfigError(f"{path}{where}: not valid YAML ({problem or str(err).splitlines()[0]})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not a config (nested too deeply)") from None
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ CLI
def _walk(cls, prefix=""):
    """(dotted key, field, type) of every leaf field of a config class."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            yield from _walk(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def help_text(cls, prog: str, description: str = "", presets: dict | None = None) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [--preset NAME] [--section.key=value ...] [--debug]", ""]
    if description:
        lines += [description.strip(), ""]
    if presets:
        lines += ["presets: " + ", ".join(presets), ""]
    default = cls()
    for key, f, tp in _walk(cls):
        value = default
        for part in key.split("."):
            value = getattr(value, part)
        flag = key if f.metadata.get("positional") else "--" + key
        lines.append(f"  {flag} ({_type_name(tp)}, default {value!r})")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    lines.append("  --debug")
    lines.append("      on an error, also print the Python traceback (or set THEMIS_DEBUG=1)")
    return "\n".join(lines)


def parse_args(
    cls,
    argv: Sequence[str] | None = None,
    prog: str = "themis_engine",
    description: str = "",
    presets: dict[str, dict] | None = None,
):
    """Build a `cls` config from presets, a config file and command-line overrides (in that order)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog, description, presets))
        raise SystemExit(0)
    leaves = {key: (f, tp) for key, f, tp in _walk(cls)}
    positional = [key for key, (f, _) in leaves.items() if f.metadata.get("positional")]
    cfg = cls()
    overrides: list[tuple[str, Any]] = []
    config_files, preset_names, given_positional = [], [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--debug":  # read by run_cli
            i += 1
            continue
        if not arg.startswith("--"):
            given_positional.append(arg)
            i += 1
            continue
        body = arg[2:]
        key, eq, value = body.partition("=")
        key_n = key.replace("-", "_")
        if key_n in ("config", "preset"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value")
                value, i = argv[i + 1], i + 1
            (config_files if key_n == "config" else preset_names).append(value)
            i += 1
            continue
        if key_n not in leaves:
            close = [k for k in leaves if k.endswith("." + key_n) or k == key_n]
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (see --help)")
        _, tp = leaves[key_n]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if tp is bool and (nxt is None or nxt.startswith("--") or nxt.lower() not in
                               ("true", "false", "1", "0", "yes", "no", "on", "off")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        overrides.append((key_n, value))
        i += 1
    for name in preset_names:
        if not presets or name not in presets:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(presets or {})}")
        apply(cfg, presets[name])
    for path in config_files:
        apply(cfg, load_file(path))
    if len(given_positional) > len(positional):
        raise ConfigError(f"unexpected argument(s): {' '.join(given_positional[len(positional):])}")
    for key, value in zip(positional, given_positional):
        set_path(cfg, key, value)
    for key, value in overrides:
        set_path(cfg, key, value)
    return cfg



# ------------------------------------------------------------------------------------------ environment
@dataclasses.dataclass(frozen=True)
class EnvironmentVariable:
    """A process-wide switch read from the environment (not per run, so not a config field)."""

    default: str
    choices: tuple[str, ...] | None  # None: any value (a path)
    help: str


# Every environment variable themis_engine reads, with its default and meaning; each is read in one
# place, through `environ` (THEMIS_NO_EXT is read by setup.py, at install time).
ENVIRONMENT: dict[str, EnvironmentVariable] = {
    "THEMIS_KERNELS": EnvironmentVariable(
        "auto", ("auto", "triton", "reference", "cuda"),
        "which implementation of each op runs (themis_engine.kernels.backend_for): auto = the Triton kernels on "
        "CUDA tensors; on the CPU PyTorch's fused CPU attention (sdpa) for attention, the PyTorch references for the "
        "rest; triton = the kernels everywhere (under TRITON_INTERPRET=1 on a CPU); reference = the references "
        "everywhere; cuda = also the experimental CUDA extension ops"),
    "THEMIS_PLANNER": EnvironmentVariable(
        "", ("", "python"), "python: the pure-Python packing planner even where the C++ one (csrc/) is built"),
    "THEMIS_FP8_COMPILE": EnvironmentVariable(
        "1", ("0", "1"), "0: the FP8 activation quantizer runs eagerly instead of through torch.compile"),
    "THEMIS_CUDA_BUILD_DIR": EnvironmentVariable(
        "~/.cache/themis_engine/cuda_ext", None, "where the CUDA extension of csrc/cuda is built on first use"),
    "THEMIS_NO_EXT": EnvironmentVariable(
        "", ("", "0", "1", "true", "false", "yes", "no", "on", "off"),
        "at install time: 1 builds without the C++ packing planner"),
    "THEMIS_DEBUG": EnvironmentVariable(
        "", ("", "0", "1", "true", "false", "yes", "no", "on", "off"),
        "1: the command-line entry points (train, eval, serve) print the Python traceback of a user error "
        "too, as --debug does (by default it is one line naming the file, row and key, exit status 2)"),
}


def environ(name: str) -> str:
    """The value of the environment variable `name` (one of ENVIRONMENT), stripped and lower-cased
    where it has choices, or its default; a value outside its choices is a ConfigError naming both."""
    var = ENVIRONMENT[name]
    value = os.environ.get(name, "").strip() or var.default  # set but empty: the default
    if var.choices is None:
        return value
    value = value.lower()
    if value not in var.choices:
        shown = ", ".join(repr(c) if c == "" else c for c in var.choices)
        raise ConfigError(f"environment variable {name}={value!r}: must be one of {shown}")
    return value


# ------------------------------------------------------------------------------------------ the user-error path
TRUE_WORDS = ("1", "true", "yes", "on")
# what a user can fix: themis_engine's own errors (each names the file, row, key or option) and the
# operating system's (a file that is not there or not readable; the message names it)
USER_ERRORS: tuple[type[BaseException], ...] = (ThemisError, OSError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined by ' | ')."""
    text = " | ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's `body(argv)` (argv without `--debug`) and return its exit status.

    A user error (USER_ERRORS) is one line on stderr, `PROG: error: MESSAGE`, and status 2; with
    `--debug` in argv or THEMIS_DEBUG=1 its traceback is printed before that line. Any other
    exception (a bug) propagates with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        debug = debug or environ("THEMIS_DEBUG") in TRUE_WORDS
        status = body(argv)
    except USER_ERRORS as err:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0 if status is None else int(status)


# Before the domain packages, `themis_engine.config` held the model's shapes and families (now
# themis_engine.model.args); those names still resolve here (see _compat.py).
from themis_engine._compat import old_config_attribute as __getattr__  # noqa: E402, F401
