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
