"""``python -m wds_tools.view PATH_OR_URL``: the same as ``wds-tools view``."""

import sys

from . import main

sys.exit(main())
