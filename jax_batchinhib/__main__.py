"""``python -m jax_batchinhib``: the same as the ``jax-batchinhib`` command."""

import sys

from jax_batchinhib.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
