"""How every ``distclip`` subcommand reports a failure: one line, ``distclip <command>: <message>``, on stderr.

Exit status, the same for every subcommand (``launch`` returns the training's own status once it
has started it):

- ``0``: done;
- ``2``: refused before anything ran: a usage error (argparse prints its usage too), a config or
  input file that cannot be used, an optional package that is missing;
- ``1``: a failure while running (e.g. an output file that cannot be written, ranks that failed);
  an unexpected error keeps its traceback, for the bug report;
- ``130``: interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys

USAGE = 2
FAILED = 1
INTERRUPTED = 130


def fail(command: str, error: BaseException | str, status: int = USAGE) -> int:
    """Print ``distclip <command>: <message>`` on stderr and return ``status`` (the exit code)."""
    message = str(error)
    if message.startswith("distclip: "):  # errors raised by the library name distclip already
        message = message[len("distclip: "):]
    print(f"distclip {command}: {message}", file=sys.stderr)
    return status
