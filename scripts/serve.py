#!/usr/bin/env python
"""Serve one model over an OpenAI-style HTTP API: `python scripts/serve.py --model flux-digits`.

The same program as the installed `teacache-serve` command (teacache_models.serve); --help lists
every flag.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from teacache_models.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
