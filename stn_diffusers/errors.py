"""How command-line entry points report a user's mistake: one line, no traceback.

``stn-diffusers`` and ``python -m stn_diffusers.finetune`` run their work through
:func:`run_reporting_errors`. An error caused by input (a missing file, a bad flag value, an
unwritable folder) prints ``error: <message>`` on stderr and returns exit status 2; with
``debug=True`` (the ``--debug`` flag) the traceback is printed too. The library raises
``ValueError``/``TypeError`` for bad input at its public boundary, so those are reported the same way;
other exceptions (``RuntimeError``, ``KeyError``…) are not caught and keep their traceback, and a
``ValueError`` raised by a bug shows its traceback with ``--debug``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

# The exceptions that mean "the input was wrong" (OSError covers missing files and permissions;
# ImportError an optional extra that is not installed, and its message names it).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)
USER_ERROR_EXIT_CODE = 2


def run_reporting_errors(function: Callable[[], object], debug: bool = False) -> int:
    """Call ``function()``; return 0, or :data:`USER_ERROR_EXIT_CODE` after one ``error: ...`` line
    on stderr when it raises one of :data:`USER_ERRORS` (with the traceback when ``debug``)."""
    try:
        function()
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0
