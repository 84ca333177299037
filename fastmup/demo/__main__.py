"""``python -m fastmup.demo mutransfer [options]``."""
import sys

from fastmup.demo import main

if __name__ == "__main__":
    sys.exit(main())
