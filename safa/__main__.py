"""``python -m safa`` = the ``safa`` command line."""
import sys

from safa.cli import main

sys.exit(main())
