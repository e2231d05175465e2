"""``python -m lopt.weightspace.zoos build|info ...``."""

import sys

from lopt.weightspace.zoos.build import main

sys.exit(main())
