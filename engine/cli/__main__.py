"""``python -m engine.cli``: the tests and the bench start the CLI this way."""

import sys

from engine.cli import main

sys.exit(main())
