"""One error type for bad user input, and the wrapper that turns it into one clear line.

Entry points call :func:`run_cli`; library code raises :class:`UserError` for anything the user can
fix (missing data, impossible flags, mismatched checkpoints, NaN loss). The wrapper prints
``error: <message>`` to stderr and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run ``main``; report :class:`UserError` (and Ctrl-C) as one line and a non-zero exit."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print(f"error: interrupted {interrupt}".rstrip(), file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        sys.exit(0)
