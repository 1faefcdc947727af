"""The base class of hvae's own errors: bad input the user can fix, not a bug.

``ConfigError``, ``DataError``, ``CheckpointError``, ``EvaluationError``,
``FIDWeightsError`` and ``hvae.cli.UsageError`` derive from ``HvaeError`` and also
keep their conventional bases (``ValueError``, ``RuntimeError``, ``FileNotFoundError``),
so ``except ValueError`` code keeps working.  Command-line entry points print an
``HvaeError`` as one line, ``prog: error: message``, and exit with code 2; any other
exception is a bug and keeps its traceback (see ``hvae.cli.entry_point``).
"""


class HvaeError(Exception):
    """A problem with the user's input (arguments, config, data, checkpoint), not a bug."""
