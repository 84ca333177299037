"""``python -m fastmup.bench``: see ``python -m fastmup.bench --help``."""
import sys

from fastmup.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
