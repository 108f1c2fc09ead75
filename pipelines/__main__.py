"""`mammoseg-pipeline` and `python -m pipelines`: compile, run or submit the Kubeflow pipeline (pipelines.cli).

The entry point checks for kfp before importing anything that needs it: where the `pipeline` extra is
not installed (a stage image, an inference host), the command says so in one line.
"""

import logging
import sys


def main() -> int:
    """Entry point of the `mammoseg-pipeline` console script; returns the exit code."""
    try:
        import kfp.kubernetes  # noqa: F401  (only to see that the extra is installed)
    except ImportError:
        sys.stderr.write("mammoseg-pipeline: error: kfp and kfp-kubernetes are not installed; they come with "
                         "the pipeline extra: pip install 'mammoseg[pipeline]'\n")
        return 2
    from pipelines.cli import main as pipeline_main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return pipeline_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
