"""``python -m fedmpq``: the ``fedmpq`` command."""
import sys

from .cli import main

sys.exit(main())
