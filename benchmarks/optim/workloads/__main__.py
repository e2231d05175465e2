"""``python -m benchmarks.optim.workloads``: see :mod:`.bench`."""

import sys

from benchmarks.optim.workloads.bench import main

sys.exit(main())
