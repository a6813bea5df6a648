"""``python -m kvpress_like.cli``: the ``kvpress-like`` command."""

import sys

from kvpress_like.cli import main

sys.exit(main())
