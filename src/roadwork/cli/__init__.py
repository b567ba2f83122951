"""``roadwork <command> key=value ...`` — one entry point for the whole job.

The grammar of every command (positionals, typed ``key=value`` options, ``--flags``, help, examples) is declared
once in :mod:`roadwork.cli.specs` and parsed by :mod:`roadwork.cli.grammar`; what a command does is in
:mod:`roadwork.cli.commands`. Help, "did you mean" suggestions and usage errors all come from the specs.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
from collections.abc import Iterator, Mapping

from roadwork.cli.grammar import parse, render_help, suggest
from roadwork.cli.specs import COMMANDS, STAGES, lookup
from roadwork.errors import RoadworkError

__all__ = ["COMMAND_HELP", "HELP", "STAGES", "command_help", "commands", "main"]

_EXAMPLES = """\
Examples:
  roadwork demo                                     # ~6 min on 2 CPU cores; prints a summary and the report path
  roadwork demo train.epochs=3 data.synthetic.n=1500
  roadwork run demo name=fog data.synthetic.seed=7 --force train
  roadwork run demo cascade.enabled=false            # the model alone, no cascade in front of it
  roadwork run demo cascade.small.deferral=learned cascade.small.gatekeeper_epochs=0
  roadwork run data.source=path/to/folder name=mydata   # one subfolder per class
  roadwork run data.source=manifest.csv conformal.alpha=0.05 selective.target_risk=0.01
  roadwork config show demo train.lr=1e-3
  roadwork data synthetic n=200 out=scenes/
  roadwork predict runs/demo/export/bundle scenes/000001.jpg
  roadwork compare demo frameworks=sklearn,xgboost,lightgbm,catboost
  roadwork serve runs/demo/export/bundle port=8000 max_batch_size=16
  roadwork serve runs/demo/export/bundle log_dir=logs/ && roadwork monitor runs/demo/export/bundle logs/
  roadwork run demo tracking.register_as=roadwork-demo && roadwork serve models:/roadwork-demo/1
  curl -s --data-binary @scenes/000001.jpg -H 'content-type: image/jpeg' localhost:8000/v1/classify
"""


def _overview() -> str:
    lines = [
        "roadwork — labelled images in; a calibrated, conformal, certified, deployable classifier out.",
        "",
        "Usage:",
    ]
    for cmd in COMMANDS.values():
        if cmd.name in STAGES and cmd.name != "predict":
            continue  # one line for every stage, below
        lines += [
            f"  {cmd.usage()}",
            *textwrap.wrap(cmd.summary, 108, initial_indent=" " * 6, subsequent_indent=" " * 6),
        ]
        if cmd.name == "demo":
            stages = ", ".join(s for s in STAGES if s != "predict")
            text = f"run up to one stage: {stages} (for predict: roadwork run --until predict)"
            lines += [
                "  roadwork STAGE [CONFIG] [key=value ...] [--force STAGE]",
                *textwrap.wrap(text, 108, initial_indent=" " * 6, subsequent_indent=" " * 6),
            ]
    lines += [
        "",
        "CONFIG is a YAML file or a preset (default, demo, scratch, finetune-cpu, finetune-gpu). Overrides use dotted keys and YAML values.",
        "Every command answers --help (roadwork COMMAND --help, or roadwork help COMMAND).",
        "",
        "",
    ]
    return "\n".join(lines) + _EXAMPLES


HELP = _overview()
"""The overview ``roadwork help`` prints: every command's usage line and summary, and examples."""


class _CommandHelp(Mapping[str, str]):
    """Each command's help by name, rendered on first access (the server's and the generator's options are
    read from their Pydantic models, which ``roadwork help`` does not import)."""

    def _names(self) -> list[str]:
        return [n for n in COMMANDS if n not in STAGES or n == "predict"]

    def __getitem__(self, name: str) -> str:
        text = command_help(name) if name in self._names() else None
        if text is None:
            raise KeyError(name)
        return text

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


COMMAND_HELP: Mapping[str, str] = _CommandHelp()
"""Each command's help as ``roadwork COMMAND --help`` prints it (the stage commands share one form)."""


def commands() -> list[str]:
    """Every command's first word (what ``roadwork help COMMAND`` and the suggestions know)."""
    return sorted({name.split()[0] for name in COMMANDS})


def command_help(topic: str) -> str | None:
    """The usage and examples of one command (or of every command a first word starts, e.g. ``config``);
    ``None`` for an unknown one."""
    own = COMMANDS.get(topic)
    subs = [c for name, c in COMMANDS.items() if name.startswith(f"{topic} ")]
    if own is None and not subs:
        return None
    return "\n".join(render_help(c) for c in ([own] if own else []) + subs)


def _unknown(args: list[str]) -> str:
    """The error for a command line no command starts: the nearest command, or the sub-commands of a group."""
    first = args[0]
    subs = [name.split()[1] for name in COMMANDS if name.startswith(f"{first} ")]
    if subs and first not in COMMANDS:  # a group ('config'): its second word is missing or misspelt
        second = args[1] if len(args) > 1 else ""
        what = f"unknown sub-command {second!r}.{suggest(second, subs)}" if second else "needs a sub-command."
        return f"roadwork {first}: {what} The sub-commands: {', '.join(subs)}. See 'roadwork help {first}'."
    return f"Unknown command {first!r}.{suggest(first, commands())} Run 'roadwork help' for the commands."


def _help(args: list[str]) -> int:
    topic = " ".join(a for a in args if a not in ("--help", "-h"))
    if not topic:
        print(HELP, flush=True)
        return 0
    text = command_help(topic)
    if text is None:
        cmd, _ = lookup(topic.split())
        text = command_help(cmd.name) if cmd is not None else None
    if text is None:
        print(f"error: {_unknown(topic.split())}", file=sys.stderr)
        return 2
    print(text.rstrip(), flush=True)
    return 0


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # said in one line, not a traceback


def _disk_full(e: BaseException) -> str | None:
    """What a full (or read-only) disk did, if that is what ``e`` is or was raised from: an ``OSError`` (ENOSPC,
    quota, too large, read-only) or SQLite's "database or disk is full" (the MLflow store); else ``None``."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_ERRORS:
            return os.strerror(cur.errno or 0) + (f" writing {cur.filename}" if cur.filename else "")
        if "disk is full" in str(cur) and type(cur).__name__ == "OperationalError":
            return f"No space left on device ({cur})"
        cur = cur.__cause__ or cur.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command line (``sys.argv[1:]`` by default); returns the exit status (2: a usage error)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except (
        BrokenPipeError
    ):  # ``roadwork --help | head``: the reader left; stop quietly, as Python's docs advise
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        return _help(args[1:])
    cmd, rest = lookup(args)
    if "--help" in rest or "-h" in rest:  # roadwork CMD --help, roadwork GROUP --help (config)
        return _help([cmd.name if cmd is not None else args[0]])
    try:
        if cmd is None:
            raise RoadworkError(_unknown(args))
        return cmd.handler(parse(cmd, rest))
    except RoadworkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        what = _disk_full(e)
        if what is None:
            raise
        print(
            f"error: {what}. Nothing half-written was kept: free space (or quota) and run the same command again "
            "(completed work is kept and resumed), or write elsewhere.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: completed stages are kept; run the same command again to resume.", file=sys.stderr
        )
        return 130
