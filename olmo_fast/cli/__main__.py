"""`python -m olmo_fast.cli ...` (what torchrun runs): the `olmo-fast` command."""
import sys

from . import main

sys.exit(main())
