"""The one argument layer of both command lines (``llamarpc`` and ``llamarpc-server``).

Each CLI is a table of `Flag` rows; `FlagParser` turns the table into an argparse parser with:
- no prefix abbreviations, and no unknown ``-xyz`` read as ``-x yz`` (``-ngl 99`` is not ``-n gl``);
- ranges and formats checked at parse time, the error naming the flag;
- an environment variable per flag (a flag on the command line wins); a bad value in one is one
  line naming the variable;
- flags of llama-server that have no effect here (``-ngl``, ``--mlock``, ...) accepted with a note;
- errors as one ``prog: error: ...`` line (exit status 2);
- help text listing every flag with its variable, generated from the same table.
Files named by flags are read with `read_file`, which names the flag and says what is wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger(__name__)

_UNSET = object()
_TRUE = ("1", "true", "on", "enabled", "yes")
_FALSE = ("0", "false", "off", "disabled", "no", "")


class CLIError(ValueError):
    """A bad flag value found after parsing (a file that cannot be read, two flags that clash)."""


@dataclasses.dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    help: str = ""
    type: Callable[[str], Any] | None = str     # None: a switch (store_true / store_false)
    default: Any = None
    env: str | None = None                      # the full variable name
    dest: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    store: bool = True                          # for switches: the value the flag stores
    append: bool = False                        # repeatable; the variable holds a comma-separated list
    group: str = ""
    ignored: str | None = None                  # accepted, no effect here: why (logged as a note)
    nargs: str | None = None                    # "?" for ignored flags with an optional value; argparse's

    @property
    def key(self) -> str:
        return self.dest or max(self.names, key=len).lstrip("-").replace("-", "_")


def ranged(kind: type, lo: float | None = None, hi: float | None = None) -> Callable[[str], Any]:
    """An int or float converter that refuses values outside [lo, hi] (and NaN / infinities)."""
    def conv(text: str) -> Any:
        try:
            v = kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{v} is out of range [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return v
    conv.__name__ = kind.__name__
    return conv


def number_list(text: str) -> str:
    """A comma-separated list of non-negative numbers (-ts 3,1), kept as text."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 3,1") from None
    if any(v < 0 or not math.isfinite(v) for v in values) or not any(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative numbers, at least one above 0")
    return text


def existing_file(text: str) -> str:
    """A path that must name a readable file (checked at parse time)."""
    problem = file_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return text


def file_problem(path: str) -> str | None:
    p = Path(path)
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "is a directory, not a file"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return None


def read_file(flag: str, path: str, binary: bool = False) -> Any:
    """The contents of the file a flag names, or a CLIError naming the flag and the problem."""
    problem = file_problem(path)
    if problem:
        raise CLIError(f"{flag} {path}: {problem}")
    try:
        return Path(path).read_bytes() if binary else Path(path).read_text()
    except UnicodeDecodeError:
        raise CLIError(f"{flag} {path}: not a text file") from None
    except OSError as e:
        raise CLIError(f"{flag} {path}: {e.strerror or e}") from None


def _truthy(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1/0, true/false, on/off)")


class FlagParser(argparse.ArgumentParser):
    """argparse over a table of `Flag` rows (see the module docstring)."""

    def __init__(self, prog: str, description: str, flags: Sequence[Flag], epilog_head: str = "") -> None:
        self.flags = list(flags)
        super().__init__(prog=prog, description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=self._epilog(epilog_head))
        groups: dict[str, argparse._ArgumentGroup] = {}
        for f in self.flags:
            target = self
            if f.group:
                if f.group not in groups:
                    groups[f.group] = self.add_argument_group(f.group)
                target = groups[f.group]    # type: ignore[assignment]
            kw: dict[str, Any] = {"dest": f.key, "default": _UNSET, "help": self._help(f)}
            if f.ignored is not None:
                kw["nargs"] = f.nargs if f.nargs else (0 if f.type is None else None)
                kw["metavar"] = f.metavar
                if kw["nargs"] == 0:
                    kw["action"] = "store_const"
                    kw["const"] = True
                    kw.pop("nargs")
                    kw.pop("metavar")
            elif f.type is None:
                kw["action"] = "store_true" if f.store else "store_false"
            else:
                kw["type"] = f.type
                kw["metavar"] = f.metavar
                if f.choices:
                    kw["choices"] = f.choices
                if f.nargs:
                    kw["nargs"] = f.nargs
                if f.append:
                    kw["action"] = "append"
                    kw["default"] = None        # argparse appends to the default
            target.add_argument(*f.names, **kw)

    @staticmethod
    def _help(f: Flag) -> str:
        text = f.help
        if f.ignored is not None:
            text = f"no effect here: {f.ignored}" + (f" ({text})" if text else "")
        elif f.default not in (None, "", False) and f.type is not None and "default" not in text:
            text += f" (default: {f.default})"
        if f.env:
            text += f" [env: {f.env}]"
        return text.replace("%", "%%")

    def _epilog(self, head: str) -> str:
        rows = [(f.env, ", ".join(f.names)) for f in self.flags if f.env]
        width = max((len(e) for e, _ in rows), default=0)
        lines = [head.rstrip(), ""] if head else []
        lines.append("environment variables (a flag on the command line wins):")
        lines += [f"  {e.ljust(width)}  {n}" for e, n in rows]
        return "\n".join(lines)

    def error(self, message: str) -> NoReturn:   # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        self._check_unknown_short(argv)
        ns = super().parse_args(argv, namespace)
        for f in self.flags:
            if f.append and getattr(ns, f.key, None) is None:
                setattr(ns, f.key, _UNSET)
            if getattr(ns, f.key, _UNSET) is _UNSET:
                # flags sharing a dest (--slots / --no-slots): the first one given or set wins
                value = self._from_env(f)
                if value is not _UNSET:
                    setattr(ns, f.key, value)
            elif f.ignored is not None:
                log.warning("%s has no effect here: %s", "/".join(f.names), f.ignored)
        for f in self.flags:       # what neither the command line nor a variable set: the default
            if getattr(ns, f.key, _UNSET) is _UNSET:
                setattr(ns, f.key, None if f.ignored is not None else f.default)
        return ns

    def _from_env(self, f: Flag) -> Any:
        raw = os.environ.get(f.env) if f.env else None
        if raw is None:
            return _UNSET
        try:
            if f.ignored is not None:
                log.warning("%s (%s) has no effect here: %s", f.env, f.names[0], f.ignored)
                return None
            if f.type is None:
                v = _truthy(raw)
                return v if f.store else not v
            if f.append:
                return [f.type(x) for x in raw.split(",") if x.strip()] or None
            value = f.type(raw)
            if f.choices and value not in f.choices:
                raise argparse.ArgumentTypeError(f"{raw!r} is not one of {', '.join(f.choices)}")
            return value
        except (argparse.ArgumentTypeError, ValueError) as e:
            self.error(f"environment variable {f.env}={raw!r} ({f.names[-1]}): {e}")

    def _check_unknown_short(self, argv: list[str]) -> None:
        """`-ngl` must not be read as `-n gl`, nor `-md` as `-m d`: an unknown single-dash word is an error."""
        known = set(self._option_string_actions)
        for tok in argv:
            if tok == "--":
                return
            if re.fullmatch(r"-[A-Za-z][A-Za-z0-9_-]+", tok) and tok not in known:
                self.error(f"unknown flag {tok}")
