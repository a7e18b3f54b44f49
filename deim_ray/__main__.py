"""`python -m deim_ray` is the `deim-ray` command."""

import sys

from deim_ray.cli.main import main

sys.exit(main())
