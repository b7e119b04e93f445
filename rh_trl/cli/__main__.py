"""``python -m rh_trl.cli`` is ``rh-trl``."""

import sys

from rh_trl.cli.main import main

sys.exit(main())
