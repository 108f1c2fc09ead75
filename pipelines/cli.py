"""`mammoseg-pipeline compile|run|submit` (also `python -m pipelines ...`): the options and what they do.

Reads params.yaml and data.dvc (the parameter defaults) and writes the compiled IR YAML; `run --local`
runs it with Docker on this machine, `submit` sends it to a KFP endpoint. A command of its own, not a
`mammoseg` subcommand: mammoseg (and every image that runs a stage) needs no kfp, which comes with the
`pipeline` extra (`pip install 'mammoseg[pipeline]'`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from components.common import IMAGE, TRAIN_IMAGE
from pipelines.images import ImageError, TaskImages, describe, package_images, require_pinned, task_images
from pipelines.local import LocalRunError, image_digest, run_local
from pipelines.settings import CompileInputs, SettingsError, load_compile_inputs, parse_set
from pipelines.submit import SubmitError, submit
from pipelines.training import compile_pipeline

log = logging.getLogger(__name__)

PROG = "mammoseg-pipeline"
DEFAULT_LOCAL_ROOT = Path("artifacts/kfp")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="override a params.yaml value before compiling (YAML value; repeatable), "
                             "e.g. -S train.epochs=2 -S 'validate.allowed_sizes=[332x256, 408x332]'")
    parser.add_argument("--image", default=None,
                        help=f"image every task but train runs in, the CPU image (default: {IMAGE}, "
                             "components/common.py); on a cluster repo@sha256:<digest>")
    parser.add_argument("--train-image", default=None,
                        help=f"image train runs in, the CUDA image (default: {TRAIN_IMAGE}; `run --local`: "
                             "--image); on a cluster repo@sha256:<digest>")
    parser.add_argument("--image-digest", default=None,
                        help="--image's digest (sha256:...) when it is a tag: a cache-key parameter of its tasks "
                             "(a repo@sha256 reference gives its own)")
    parser.add_argument("--train-image-digest", default=None,
                        help="--train-image's digest when it is a tag: train's cache-key parameter")


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-uri", default=None, help="DVC remote of the raw data (default: pipeline.data_remote)")
    parser.add_argument("--data-hash", default=None, help="directory hash of the raw data (default: data.dvc's)")
    parser.add_argument("--package", type=Path, default=None,
                        help="compiled IR YAML to use as it is (no --set); default: compile params.yaml now")


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of `mammoseg-pipeline`."""
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="The Kubeflow pipeline: compile it, run it locally in Docker, "
                                     "or submit it to a KFP endpoint. Defaults come from params.yaml.")
    parser.add_argument("--params", type=Path, default=None,
                        help="params.yaml to take the defaults from (default: the repository's; data.dvc is read "
                             "beside it)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="<action>")
    compile_ = actions.add_parser("compile", help="write the pipeline's IR YAML")
    compile_.add_argument("--output", type=Path, required=True, help="IR YAML to write")
    _common(compile_)

    run = actions.add_parser("run", help="run the pipeline on this machine (kfp.local.DockerRunner)")
    run.add_argument("--local", action="store_true", required=True,
                     help="run with Docker on this machine, containers on the host network (required; "
                          "a cluster run is `submit`)")
    run.add_argument("--pipeline-root", type=Path, default=DEFAULT_LOCAL_ROOT,
                     help=f"where task outputs go (default: {DEFAULT_LOCAL_ROOT})")
    run.add_argument("--cache", action="store_true", help="reuse outputs of earlier identical local tasks")
    _common(run)
    _run_args(run)

    sub = actions.add_parser("submit", help="submit to a Kubeflow Pipelines endpoint (kfp.Client)")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.org/pipeline")
    sub.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user deployments)")
    sub.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.experiment)")
    sub.add_argument("--run-name", default=None, help="run name (default: the pipeline's name)")
    sub.add_argument("--recurring", metavar="CRON", default=None,
                     help="create a recurring run on this 6-field cron schedule (e.g. '0 0 3 * * 1')")
    sub.add_argument("--max-concurrency", type=int, default=1, help="recurring runs allowed at once")
    sub.add_argument("--allow-mutable-tag", action="store_true",
                     help="submit images given by tag (refused by default: a retry or another node may pull "
                          "another image under the same tag)")
    _common(sub)
    _run_args(sub)
    return parser


def _inputs(args: argparse.Namespace) -> CompileInputs:
    return load_compile_inputs(args.params, parse_set(args.overrides))


def _arguments(args: argparse.Namespace, image_digest: str | None, train_image_digest: str | None) -> dict[str, str]:
    """Pipeline parameter values given on the command line (the rest keep the package's defaults)."""
    values = {"data_uri": args.data_uri, "data_hash": args.data_hash, "image_digest": image_digest,
              "train_image_digest": train_image_digest}
    return {k: v for k, v in values.items() if v}


def _package(args: argparse.Namespace, out: Path, images: TaskImages) -> Path:
    """Return the IR YAML to run: --package as it is, else params.yaml compiled to `out`."""
    if args.package is not None:
        if args.overrides:
            raise SettingsError("--set changes the compile-time defaults; it cannot apply to --package")
        return args.package
    return _compile(out, _inputs(args), images)


def _compile(out: Path, inputs: CompileInputs, images: TaskImages) -> Path:
    """Compile to `out`, logging each task's image and whether its reference is pinned by digest."""
    path = compile_pipeline(out, inputs, images)
    log.info("compiled %s: %s", path, describe([("train", images.train_image), ("every other task", images.image)]))
    return path


def _local_images(args: argparse.Namespace) -> TaskImages:
    """The images of a local run: kfp.local gives containers no GPU, so train runs --image unless told.

    A tag is fine here: the images come from this machine's engine, and their engine digests become
    the cache-key parameters.
    """
    image = args.image or IMAGE
    train_image = args.train_image or image
    return task_images(image, train_image, args.image_digest or image_digest(image),
                       args.train_image_digest or image_digest(train_image))


def main(argv: Sequence[str]) -> int:
    """Run `mammoseg-pipeline [--params FILE] <action> ...`; return the exit code (2 with a one-line error)."""
    args = build_parser().parse_args(list(argv))
    try:
        if args.action == "compile":
            # Tags are accepted here (compiling only writes YAML); the log says which references are pinned.
            path = _compile(args.output, _inputs(args), task_images(args.image, args.train_image, args.image_digest,
                                                                    args.train_image_digest))
            sys.stdout.write(f"{path}\n")
            return 0
        if args.action == "run":
            images = _local_images(args)
            inputs = _inputs(args)
            package = _package(args, args.pipeline_root / f"{inputs.pipeline.name}.yaml", images)
            log.info("running %s locally in %s (%s), train in %s (%s)", package, images.image, images.image_digest,
                     images.train_image, images.train_image_digest)
            result = run_local(package, args.pipeline_root, images.image,
                               _arguments(args, images.image_digest, images.train_image_digest), os.environ,
                               inputs.pipeline.shm_size, cache=args.cache)
            sys.stdout.write(f"{result.decision}\n")
            return 0
        inputs = _inputs(args)
        if args.package is not None and (args.image or args.train_image):
            raise SettingsError("--image and --train-image are compiled into a package; they cannot apply to --package")
        images = task_images(args.image, args.train_image, args.image_digest, args.train_image_digest)
        # What the nodes will pull, checked before anything is compiled or sent.
        require_pinned(package_images(args.package) if args.package is not None else
                       {"train": images.train_image, "every other task": images.image}, args.allow_mutable_tag)
        with tempfile.TemporaryDirectory() as tmp:
            package = _package(args, Path(tmp) / "pipeline.yaml", images)
            done = submit(package, args.host, args.experiment or inputs.pipeline.experiment,
                          _arguments(args, images.image_digest, images.train_image_digest),
                          args.run_name or inputs.pipeline.name,
                          namespace=args.namespace, schedule=args.recurring, max_concurrency=args.max_concurrency)
        sys.stdout.write(f"{done.kind} {done.id} (experiment {done.experiment})\n")
        return 0
    except (SettingsError, LocalRunError, SubmitError, ImageError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
