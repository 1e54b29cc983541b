"""``python -m vhostuser`` is the ``vhostuser`` command."""
import sys

from .cli import main

sys.exit(main())
