"""A command's plumbing: flags that read as one clear error line, the run that turns bad input
into ``error: ...`` and a non-zero exit (no traceback), and how results are printed."""
from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
from typing import Any, Callable

from traces.common.errors import TideError
from traces.common.values import INT64_MAX


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line too (a TideError), not usage text."""

    def error(self, message: str):  # type: ignore[override]
        m = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if m and any(m.group(2).startswith(opt + " ") for opt in m.group(1).split("/")):
            message = m.group(2)  # a check's own line names the flag already
        raise TideError(message)


def number(text: str) -> float:
    """A flag's finite number (``nan`` and ``inf`` are refused: a limit of NaN fits everything)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def integer(text: str) -> int:
    """A flag's integer, at most 64 bits (numpy and torch take no more)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} does not fit in 64 bits")
    return v


def comma_list(text: str, flag: str, convert: Callable[[str], Any], what: str = "values") -> list[Any]:
    """A flag's comma-separated values, each through ``convert``; a value it cannot read
    (ValueError, argparse's type error) or no value at all is one error line naming the flag,
    and a TideError of ``convert``'s own (a range, a choice) is passed on as it is."""
    try:
        vals = [convert(v) for v in (s.strip() for s in text.split(",")) if v]
    except TideError:  # the converter's own line (a range, a choice) says more
        raise
    except (ValueError, argparse.ArgumentTypeError):
        raise TideError(f"{flag}: expected comma-separated {what}, got {text!r}") from None
    if not vals:
        raise TideError(f"{flag}: no values")
    return vals


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so its cleanup (``finally``, pools) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main`` and exit; a TideError or an unreadable file becomes one line on stderr;
    SIGTERM and Ctrl-C unwind (workers ended, temporaries removed) and exit 143 or 130."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main(argv)
    except TideError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a file the command could not read or write (missing, no space, no permission)
        print(f"error: {exc.filename or 'I/O'}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(143)
    sys.exit(code or 0)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1))

def span(values: Any) -> str:
    """``"lo-hi"`` of per-layer values (``"v"`` when all equal): a plan's taus or budgets in a table cell."""
    lo, hi = int(min(values)), int(max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"
