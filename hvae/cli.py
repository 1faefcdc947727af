"""What every command-line entry point shares: one-line errors and argument checks.

Bad input ends a command with ONE line on stderr, ``prog: error: message``, and exit
code 2 (argparse's convention), never a traceback; a traceback means a bug.

    parser = cli.ArgumentParser(prog="evaluate.py")     # one-line usage errors
    parser.add_argument("--num", type=cli.integer(1))
    parser.add_argument("--device", type=cli.DEVICE)

    @cli.entry_point("evaluate.py")                       # HvaeError -> one line, exit 2
    def main(argv=None): ...

Checks that need more than one argument raise ``UsageError`` after parsing.  Nothing
here imports torch at module level, so argument errors stay instant.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

from hvae.errors import HvaeError, RunFailed, exhausted

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT


class UsageError(HvaeError, ValueError):
    """A command-line value, or combination of values, that is not allowed."""


# ------------------------------------------------------------------ reporting
def one_line(message: object) -> str:
    """``message`` as one line.  An error re-raised by a DataLoader worker carries the
    worker's whole traceback in its message: only its last line (the original message)
    is kept."""
    text = str(message)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        name, _, rest = lines[-1].partition(": ")
        lines = [rest if rest and name.rsplit(".", 1)[-1].isidentifier() else lines[-1]]
    return "; ".join(lines) or type(message).__name__


def fail(prog: str, message: object, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``prog: error: message`` (one line) on stderr and exit with ``code``."""
    sys.stderr.flush()
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def entry_point(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``main(argv=None)``: the project's own errors (``HvaeError``) end the
    command with one line and their exit code (2 for bad input, 1 for a run that
    failed), and so does a resource that ran out (disk, memory: 1); Ctrl-C ends it with
    one line and 130; anything else propagates with its traceback."""
    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except HvaeError as err:
                fail(prog, err, err.exit_code)
            except Exception as err:  # a resource ran out where no caller said more
                resource = exhausted(err)
                if resource is None:
                    raise
                first = next((l.strip() for l in str(err).splitlines() if l.strip()), "")
                fail(prog, f"out of {resource}: {first}" if resource != "disk space" else
                     f"no space left on device: {first}", RunFailed.exit_code)
            except KeyboardInterrupt:
                sys.stderr.write(f"\n{prog}: interrupted (Ctrl-C)\n")
                sys.stderr.flush()
                raise SystemExit(EXIT_INTERRUPTED) from None
        return wrapped
    return decorate


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: message`` (no usage dump: a
    usage line of every config flag would bury the message), exit code 2.

    Options must be spelt in full: argparse's abbreviations are off, so a mistyped
    ``--num_latent`` is an error that names the flags it may have meant, not silently
    ``--num_latent_scales`` or ``--num_latent_per_group``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        args = list(sys.argv[1:] if args is None else args)
        unknown = [a for a in args[:args.index("--") if "--" in args else None]
                   if self._is_unknown_option(a)]
        if unknown:  # reported first: a missing required flag may be the one mistyped
            self.error(unknown_options(self, unknown))
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _is_unknown_option(self, arg: str) -> bool:
        """Whether argparse would read ``arg`` as an option it does not have."""
        if len(arg) < 2 or arg[0] not in self.prefix_chars or " " in arg:
            return False
        try:
            float(arg)  # a negative number is a value
            return False
        except ValueError:
            return arg.split("=", 1)[0] not in self._option_string_actions

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def unknown_options(parser: argparse.ArgumentParser, options: list[str]) -> str:
    """The message for ``options`` that ``parser`` does not have, each with the options it
    may have meant: those it begins, else the closest spelling (dashes and underscores
    count as the same)."""
    spelling: dict[str, str] = {}  # normalised name -> the option's first long spelling
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                spelling.setdefault(option[2:].replace("-", "_"), option)
    hints = []
    for option in (o.split("=", 1)[0] for o in options):
        name = option.lstrip("-").replace("-", "_")
        meant = ([key for key in spelling if key.startswith(name)][:3]
                 or difflib.get_close_matches(name, spelling, n=1))
        hints.append(option + (f" (did you mean {' or '.join(spelling[m] for m in meant)}?)"
                               if meant else ""))
    return f"unknown option{'s' if len(hints) > 1 else ''}: {', '.join(hints)}"


# ------------------------------------------------------------ argument types
def argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a parser that raises ``ValueError`` with a good message:
    argparse then reports that message (it would replace a plain ValueError's)."""
    @functools.wraps(parse)
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return wrapped


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``minimum`` (and <= ``maximum``); counts use 1,
    options where 0 means "all" or "none" use 0."""
    allowed = (f"an integer >= {minimum}" if maximum is None
               else f"an integer from {minimum} to {maximum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {allowed}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value} is not allowed: {allowed}")
        return value
    parse.__name__ = "integer"
    return parse


def finite_float(minimum: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """argparse ``type``: a finite number, >= ``minimum`` (> with ``above``) when given."""
    allowed = "a finite number" + ("" if minimum is None else
                                   f" {'>' if above else '>='} {minimum:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {allowed}") from None
        ok = value == value and abs(value) != float("inf")
        if ok and minimum is not None:
            ok = value > minimum if above else value >= minimum
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: {allowed}")
        return value
    return parse


def parse_device(text: str | None) -> str | None:
    """``--device`` text checked against this machine: its canonical name ("cpu",
    "cuda:1" ...), or None (automatic choice) for None / "".  ``UsageError`` for a
    name torch does not know, or a device this machine does not have."""
    if text is None or not str(text).strip():
        return None
    import torch

    text = str(text).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{text!r} is not a device: cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return str(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{text!r} is not available: this machine has no usable CUDA GPU "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{text!r} does not exist: this machine has {count} CUDA "
                             f"device(s), cuda:0 to cuda:{count - 1}")
        return str(device)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{text!r} is not available on this machine; use --device cpu")
        return str(device)
    raise UsageError(f"{text!r} is not supported: cpu, cuda, cuda:N or mps")


DEVICE = argtype(parse_device)  # argparse type for --device


@argtype
def boolean(text: str) -> bool:
    """argparse ``type``: true/false, yes/no, on/off, 1/0 (as config fields take them)."""
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"{text!r} is not allowed: true or false")
    return value


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder that exists or can be created: not an existing file, no file on the way,
    writable.  Returns it as a Path; ``UsageError`` naming ``flag`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is an existing file, not a folder: give a "
                         "folder (it is created when missing)")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: {str(parent)!r} is not writable")
    return path


def check_new_file(path: str | os.PathLike, flag: str, overwrite: bool) -> Path:
    """A file to write: not a folder, and not an existing file unless ``overwrite``
    (the tool's ``--overwrite``).  ``UsageError`` naming ``flag`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; give the file to write")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {str(path)!r} already exists: give another path, or "
                         "--overwrite to replace it")
    return path


def check_input_file(path: str | os.PathLike, flag: str) -> Path:
    """An existing file (not a folder); ``UsageError`` naming ``flag`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder, not a file")
    if not path.is_file():
        raise UsageError(f"{flag} {str(path)!r}: no such file")
    return path
