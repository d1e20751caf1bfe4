"""``python -m tests.fuzz --min-count N``: run the fuzzers long (``make fuzz``).

The command line itself lives in :mod:`tests.fuzz.cli`, so that importing
the package (as ``tests/test_fuzz.py`` does) never imports this module.
"""

import sys

from tests.fuzz.cli import main

sys.exit(main())
