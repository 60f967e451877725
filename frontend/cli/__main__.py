"""``python -m llamarpc.frontend.cli``: the ``llamarpc`` command."""
import sys

from .main import main

sys.exit(main())
