"""The images the pipeline's tasks run in: which task gets which, and which references are pinned.

Reads image references (from the command line or a compiled IR YAML); writes nothing. A reference
pinned by digest (`registry/repo@sha256:<64 hex>`, optionally with a tag before the `@`) names one
image for good; a tag (`mammoseg:cpu`, `:latest`) names whatever was pushed last, so on a cluster a
retry or another node may run a different image than the first attempt did. `submit` therefore
refuses tags unless told otherwise, and the cache-key parameters take the digest from the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from components.common import IMAGE, TRAIN_IMAGE

log = logging.getLogger(__name__)

# What follows the `@` of a pinned reference; the only digest algorithm registries use for images.
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class ImageError(ValueError):
    """A malformed reference, a digest that contradicts its reference, or a refused tag (one line)."""


@dataclasses.dataclass(frozen=True)
class TaskImages:
    """The image every task but train runs in, train's image, and the digest each one's tasks key on.

    Attributes:
        image: the (CPU) image of data, ingest, validate, preprocess, evaluate, export, register and
            the checkpoint tasks.
        train_image: the (CUDA) image of train.
        image_digest: `image`'s digest (sha256:...), "" when unknown; a cache-key parameter.
        train_image_digest: `train_image`'s digest, "" when unknown; train's cache-key parameter.
    """

    image: str
    train_image: str
    image_digest: str
    train_image_digest: str


def reference_digest(reference: str) -> str:
    """Return the digest a reference is pinned to (sha256:...), "" for a tag.

    Raises:
        ImageError: the reference is empty, or has an `@` not followed by a sha256 digest.
    """
    if not reference.strip() or reference != reference.strip():
        raise ImageError(f"image reference {reference!r} is empty or has surrounding spaces")
    name, at, digest = reference.rpartition("@")
    if not at:
        return ""
    if not name or not DIGEST.fullmatch(digest):
        raise ImageError(f"image reference {reference!r}: expected repo@sha256:<64 hex digits> after the '@'")
    return digest


def _digest_for(reference: str, given: str | None, flag: str) -> str:
    pinned = reference_digest(reference)
    if given and not DIGEST.fullmatch(given):
        raise ImageError(f"{flag} {given!r}: expected sha256:<64 hex digits>")
    if given and pinned and given != pinned:
        raise ImageError(f"{flag} {given} contradicts the digest in {reference}")
    return pinned or given or ""


def task_images(image: str | None = None, train_image: str | None = None, image_digest: str | None = None,
                train_image_digest: str | None = None) -> TaskImages:
    """Resolve the command line's image options into each task's image and cache-key digest.

    Args:
        image: every task's image but train's; default components.common.IMAGE.
        train_image: train's image; default components.common.TRAIN_IMAGE.
        image_digest: `image`'s digest, for a tag (a pinned reference carries its own).
        train_image_digest: `train_image`'s digest, likewise.

    Raises:
        ImageError: a malformed reference or digest, or a digest that contradicts its reference.
    """
    image, train_image = image or IMAGE, train_image or TRAIN_IMAGE
    return TaskImages(image, train_image, _digest_for(image, image_digest, "--image-digest"),
                      _digest_for(train_image, train_image_digest, "--train-image-digest"))


def package_images(package: Path) -> dict[str, str]:
    """Return executor label -> image of a compiled IR YAML (what a cluster's nodes will pull).

    Raises:
        ImageError: the file is not a compiled pipeline.
    """
    try:
        spec = next(yaml.safe_load_all(package.read_text()))
        executors = spec["deploymentSpec"]["executors"]
        return {label: executor["container"]["image"] for label, executor in executors.items()}
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError) as exc:
        raise ImageError(f"{package}: not a compiled pipeline ({type(exc).__name__}: {exc})") from None


def mutable_images(images: Mapping[str, str]) -> dict[str, str]:
    """Return the entries of `images` whose reference is a tag, not pinned by digest."""
    return {task: reference for task, reference in images.items() if not reference_digest(reference)}


def require_pinned(images: Mapping[str, str], allow_mutable_tag: bool) -> None:
    """Refuse tags among the images a cluster will pull, unless `allow_mutable_tag` (then warn).

    Args:
        images: task or executor -> image reference.
        allow_mutable_tag: accept tags, with a warning per image.

    Raises:
        ImageError: a reference is malformed, or is a tag and tags are not allowed.
    """
    mutable = mutable_images(images)
    if not mutable:
        return
    tags = sorted(set(mutable.values()))
    if not allow_mutable_tag:
        raise ImageError(f"{', '.join(tags)}: image given by a mutable tag; a retry or another node may pull "
                         "another image under it: give repo@sha256:<digest> (docker inspect --format "
                         "'{{index .RepoDigests 0}}' IMAGE, after docker push) or pass --allow-mutable-tag")
    for tag in tags:
        log.warning("image %s is a mutable tag (--allow-mutable-tag): the nodes run whatever it names when "
                    "they pull", tag)


def describe(images: Iterable[tuple[str, str]]) -> str:
    """Return `task=reference (pinned|tag)` pairs on one line, for the log of what was compiled."""
    return ", ".join(f"{task}={ref} ({'pinned' if reference_digest(ref) else 'tag'})" for task, ref in images)
