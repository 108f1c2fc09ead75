"""`python -m pipelines compile|run|submit ...`: the same as `mammoseg pipeline ...` (repository params.yaml)."""

import logging
import sys

from pipelines.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
