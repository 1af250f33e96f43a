"""``python -m distclip``: the ``distclip`` command."""

import sys

from .cli import main

sys.exit(main())
