"""``python -m benchmarks.weightspace``: see :mod:`benchmarks.weightspace.run`."""

import sys

from benchmarks.weightspace.run import main

sys.exit(main())
