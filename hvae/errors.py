"""The base classes of hvae's own errors: problems the user can fix, not bugs.

``ConfigError``, ``DataError``, ``CheckpointError``, ``EvaluationError``,
``FIDWeightsError`` and ``hvae.cli.UsageError`` derive from ``HvaeError`` and also
keep their conventional bases (``ValueError``, ``RuntimeError``, ``FileNotFoundError``),
so ``except ValueError`` code keeps working.  Command-line entry points print an
``HvaeError`` as one line, ``prog: error: message``, and exit with its ``exit_code``:
2 for bad input, 1 for a ``RunFailed`` (diverged weights, a full disk, no memory).
Any other exception is a bug and keeps its traceback (see ``hvae.cli.entry_point``).
"""


class HvaeError(Exception):
    """A problem with the user's input (arguments, config, data, checkpoint), not a bug."""

    exit_code = 2  # argparse's code for bad input


class RunFailed(HvaeError):
    """A valid run that could not go on (weights became non-finite, a resource ran out):
    one line like bad input, but exit code 1."""

    exit_code = 1


def error_chain(err: BaseException):
    """``err`` and the exceptions it was raised from or during (``__cause__``, ``__context__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def exhausted(err: BaseException) -> str | None:
    """Which resource ran out when ``err`` says one did: "disk space", "host memory" or
    "device memory" (torch.OutOfMemoryError: a GPU's); None otherwise.  A failed write
    inside torch.save surfaces as a RuntimeError whose context is the OSError."""
    import errno

    for e in error_chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk space"
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError)
                                          and "can't allocate memory" in str(e)):
            return "host memory"
        if type(e).__name__ == "OutOfMemoryError":
            return "device memory"
    return None
