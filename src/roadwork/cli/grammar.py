"""The one option grammar of ``roadwork COMMAND [POSITIONAL ...] [key=value ...] [--flag VALUE]``.

Every command is a :class:`Command`: its positionals, its typed ``key=value`` options, its ``--flags``, whether
it takes a ``[CONFIG]`` file or preset and dotted config overrides, a description and examples. :func:`parse`
turns argv into a :class:`Parsed` (typed values, defaults filled in) or raises :class:`UsageError` with the
command's usage line and a "did you mean" drawn from the command's own options; :func:`render_help` writes the
per-command ``--help`` from the same spec, so help, suggestions and errors cannot drift apart.

Only the standard library is imported here, and only what is cheap (named tuples, not dataclasses, whose import
pulls in ``inspect``): ``roadwork help`` must start fast.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from roadwork.errors import RoadworkError

__all__ = [
    "Command",
    "Flag",
    "Option",
    "Parsed",
    "Positional",
    "UsageError",
    "parse",
    "render_help",
    "suggest",
    "usage_error",
]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class UsageError(RoadworkError):
    """A command line that does not fit its command's grammar (exit status 2)."""


def suggest(word: str, candidates: Sequence[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


class Positional(NamedTuple):
    """A positional argument: ``name`` as shown in the usage line; ``many`` takes one or more."""

    name: str
    help: str = ""
    required: bool = True
    many: bool = False


class Option(NamedTuple):
    """A ``key=value`` option.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``list`` (comma-separated) and ``yaml`` (a YAML
    scalar or list, checked later by the model it feeds, e.g. the server's settings). ``choices`` restrict a
    ``str`` or each item of a ``list``. ``default`` is filled in when the option is absent.
    """

    name: str
    kind: str = "str"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    required: bool = False
    metavar: str = ""  # shown in the usage line (default: from the kind)


class Flag(NamedTuple):
    """A ``--name VALUE`` (or ``--name=VALUE``) flag; repeatable, every value kept in order."""

    name: str
    metavar: str
    help: str = ""
    choices: tuple[str, ...] = ()
    what: str = "value"  # the noun in an error: "Unknown stage 'trian'"


class Command(NamedTuple):
    """One command's grammar, help and handler.

    ``name`` may be two words (``data synthetic``, ``config show``, ``sign keygen``). ``config`` takes an
    optional first positional CONFIG (a YAML file or preset); ``overrides`` passes every ``key=value`` that is
    not one of ``options`` on as a config override (``train.epochs=3``), which the config loader checks and
    explains. ``extra_options`` is a lazy source of more options (read only when parsing or for help, e.g.
    the server's settings from its Pydantic model). ``handler`` is called with the :class:`Parsed` arguments.
    """

    name: str
    summary: str
    description: str
    examples: tuple[str, ...]
    handler: Callable[[Parsed], int]
    positionals: tuple[Positional, ...] = ()
    options: tuple[Option, ...] = ()
    flags: tuple[Flag, ...] = ()
    config: bool = False
    overrides: bool = False
    extra_options: Callable[[], tuple[Option, ...]] | None = None

    def all_options(self) -> tuple[Option, ...]:
        """The command's options, with the lazily read ones after its own."""
        return self.options + (self.extra_options() if self.extra_options is not None else ())

    def usage(self) -> str:
        """The usage line: ``roadwork NAME [CONFIG] POSITIONALS [key=value ...] [--flag VALUE]``."""
        parts = [f"roadwork {self.name}"]
        if self.config:
            parts.append("[CONFIG]")
        for p in self.positionals:
            shown = f"{p.name} [{p.name} ...]" if p.many else p.name
            parts.append(shown if p.required else f"[{shown}]")
        for o in self.options:
            if o.required:
                parts.append(f"{o.name}={_metavar(o)}")
        if self.overrides or any(not o.required for o in self.options) or self.extra_options:
            parts.append("[key=value ...]")
        parts += [f"[{f.name} {f.metavar}]" for f in self.flags]
        return " ".join(parts)


class Parsed:
    """A parsed command line: positionals by name (a list for ``many``), typed options (defaults filled in),
    flag values in order, the CONFIG, the config overrides, and which options were given (not defaulted)."""

    def __init__(self, command: Command) -> None:
        self.command = command
        self.positionals: dict[str, Any] = {}
        self.options: dict[str, Any] = {}
        self.flags: dict[str, list[str]] = {f.name: [] for f in command.flags}
        self.config: str | None = None
        self.overrides: list[str] = []
        self.given: frozenset[str] = frozenset()


def _metavar(o: Option) -> str:
    if o.metavar:
        return o.metavar
    if o.choices and o.kind == "str":
        return "|".join(o.choices)
    return {"int": "N", "float": "X", "bool": "true|false", "list": "A,B"}.get(o.kind, o.name.upper())


def usage_error(cmd: Command, message: str) -> UsageError:
    """The one form of every usage error: ``roadwork CMD: what is wrong``, the usage line, where help is."""
    return UsageError(
        f"roadwork {cmd.name}: {message}\nUsage: {cmd.usage()}\nSee 'roadwork {cmd.name} --help'."
    )


def _convert(cmd: Command, o: Option, raw: str) -> Any:
    """``raw`` as the option's kind, or a :class:`UsageError` naming the option, the value and what fits."""
    if o.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise usage_error(cmd, f"{o.name}={raw!r} is not a whole number.") from None
    if o.kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise usage_error(cmd, f"{o.name}={raw!r} is not a number.") from None
    if o.kind == "bool":
        if raw.lower() not in (*_TRUE, *_FALSE):
            raise usage_error(cmd, f"{o.name}={raw!r} must be true or false.")
        return raw.lower() in _TRUE
    if o.kind == "list":
        items = [s for s in raw.split(",") if s]
        bad = [s for s in items if o.choices and s not in o.choices]
        if bad:
            raise usage_error(cmd, f"{o.name}={','.join(bad)} is unknown; choose from {','.join(o.choices)}.")
        return items
    if o.kind == "yaml":
        import yaml

        from roadwork.config import yaml_load

        try:  # as configs are read: no aliases, so a few bytes cannot expand into gigabytes
            return yaml_load(raw) if raw else None
        except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: an integer of 4,300+ digits
            return raw  # not YAML (or aliases): the model it feeds decides whether the string is allowed
    if o.choices and raw not in o.choices:
        hint = suggest(raw, o.choices)
        raise usage_error(cmd, f"{o.name}={raw!r} is not one of {', '.join(o.choices)}.{hint}")
    return raw


def _take_flag(cmd: Command, args: list[str], i: int, found: dict[str, list[str]]) -> int:
    """Read the flag at ``args[i]`` (``--name VALUE`` or ``--name=VALUE``); returns the next index."""
    name, eq, value = args[i].partition("=")
    flags = {f.name: f for f in cmd.flags}
    if name not in flags:
        hint = suggest(name, list(flags))
        listed = ", ".join(flags) or "none"
        raise usage_error(cmd, f"unknown option {args[i]!r}.{hint} Its flags: {listed}.")
    if not eq:
        if i + 1 >= len(args):
            example = flags[name].choices[1] if len(flags[name].choices) > 1 else "VALUE"
            raise usage_error(cmd, f"{name} needs a value, e.g. {name} {example}.")
        i += 1
        value = args[i]
    f = flags[name]
    if f.choices and value not in f.choices:
        hint = suggest(value, f.choices)
        raise usage_error(
            cmd, f"Unknown {f.what} {value!r}.{hint} The {f.what}s are: {', '.join(f.choices)}."
        )
    found[name].append(value)
    return i + 1


def _assign_positionals(cmd: Command, words: list[str], parsed: Parsed) -> None:
    """Words in order: CONFIG first (when the command takes one), then the positionals."""
    if cmd.config and words:
        parsed.config = words.pop(0)
    for k, p in enumerate(cmd.positionals):
        if p.many:
            rest = cmd.positionals[k + 1 :]
            n = max(len(words) - len(rest), 0)
            taken, words = words[:n], words[n:]
            if p.required and not taken:
                raise usage_error(cmd, f"missing {p.name} (one or more).")
            parsed.positionals[p.name] = taken
        elif words:
            parsed.positionals[p.name] = words.pop(0)
        elif p.required:
            raise usage_error(cmd, f"missing {p.name}.")
        else:
            parsed.positionals[p.name] = None
    if words:
        what = "argument" if len(words) == 1 else "arguments"
        raise usage_error(cmd, f"unexpected {what} {' '.join(map(repr, words))} (options are key=value).")


def parse(cmd: Command, args: Sequence[str]) -> Parsed:
    """``args`` (after the command's name) → :class:`Parsed`, or a :class:`UsageError` that says what is wrong,
    with the usage line and a suggestion from this command's own options and flags."""
    options = {o.name: o for o in cmd.all_options()}
    parsed = Parsed(cmd)
    words: list[str] = []
    given: set[str] = set()
    args = list(args)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            i = _take_flag(cmd, args, i, parsed.flags)
            continue
        key, eq, raw = a.partition("=")
        if not eq or "://" in key:  # a URL argument (postgresql://...?host=...) is a word, not key=value
            words.append(a)
        elif key in options:
            parsed.options[key] = _convert(cmd, options[key], raw)
            given.add(key)
        elif cmd.overrides:
            parsed.overrides.append(a)  # a config key: the config loader checks and explains it
        else:
            hint = suggest(key, list(options))
            listed = f" Its options: {', '.join(options) or 'none'}." if len(options) <= 10 else ""
            raise usage_error(cmd, f"unknown option {key!r}.{hint}{listed}")
        i += 1
    _assign_positionals(cmd, words, parsed)
    for o in options.values():
        if o.name not in parsed.options:
            if o.required:
                raise usage_error(cmd, f"{o.name}= is required ({o.help or 'see --help'}).")
            parsed.options[o.name] = o.default
    parsed.given = frozenset(given)
    return parsed


def _option_lines(options: Sequence[Option]) -> list[str]:
    lines = []
    for o in options:
        if o.required:
            head = f"  {o.name}={_metavar(o)}"
        else:
            head = f"  {o.name}={o.default if o.default not in (None, '') else _metavar(o)}"
        if o.kind == "list" and o.choices:
            head = f"  {o.name}=A,B   ({','.join(o.choices)})"
        text = o.help + (f" (one of: {', '.join(o.choices)})" if o.choices and o.kind == "str" else "")
        lines += textwrap.wrap(
            text, width=110, initial_indent=f"{head:<30} ", subsequent_indent=" " * 31
        ) or [head]
    return lines


def render_help(cmd: Command) -> str:
    """The command's ``--help``: usage, description, positionals, options, flags and examples."""
    out = [f"Usage: {cmd.usage()}", "", textwrap.fill(cmd.description.strip(), 110)]
    if cmd.config:
        out += [
            "",
            "CONFIG is a YAML file or a preset (default, demo, finetune-cpu, finetune-gpu); overrides are dotted keys (train.lr=1e-3).",
        ]
    if cmd.positionals:
        out += ["", "Arguments:"] + [f"  {p.name:<28} {p.help}".rstrip() for p in cmd.positionals]
    options = cmd.all_options()
    if options:
        out += ["", "Options:", *_option_lines(options)]
    if cmd.flags:
        out += ["", "Flags:"] + [f"  {f.name + ' ' + f.metavar:<28} {f.help}".rstrip() for f in cmd.flags]
    out += ["", "Examples:", *(f"  {e}" for e in cmd.examples)]
    return "\n".join(out) + "\n"
