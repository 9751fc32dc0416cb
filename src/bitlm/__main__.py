"""`python -m bitlm` is the `bitlm` command."""

import sys

from .cli import main

sys.exit(main())
