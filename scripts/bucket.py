"""Create the team stack's artifact bucket, copy it into a folder, or copy a folder back into it.

The artifact half of `scripts/stack.sh backup` / `restore` (pg_dump is the other half). The endpoint is
$MLFLOW_S3_ENDPOINT_URL, the one the tracking server writes to (unset: AWS itself); credentials come from
the environment as boto3 reads them.

    python scripts/bucket.py create BUCKET
    python scripts/bucket.py download BUCKET DIR   # every object, as DIR/<key>
    python scripts/bucket.py upload DIR BUCKET     # every file under DIR, as <its path under DIR>
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger("bucket")


def _client():
    return boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL"))


def create(bucket: str) -> None:
    """Create the bucket unless it exists already (a restore into a new, empty store needs it)."""
    s3 = _client()
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)


def download(bucket: str, folder: Path) -> int:
    """Copy every object of the bucket to folder/<key>; return how many."""
    s3 = _client()
    folder.mkdir(parents=True, exist_ok=True)  # an empty bucket is an empty folder, not a missing one
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            target = folder / item["Key"]
            # A key is a path inside the folder; one that climbs out of it is not ours to write.
            if not target.resolve().is_relative_to(folder.resolve()):
                raise ValueError(f"s3://{bucket}/{item['Key']}: key leaves the backup folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    return count


def upload(folder: Path, bucket: str) -> int:
    """Copy every file under folder to the bucket, keyed by its path under folder; return how many.

    Objects the bucket holds beyond the folder's stay: they are unreferenced after a restore of the
    database, and deleting from a live store is not a restore's business.
    """
    create(bucket)
    s3 = _client()
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    for path in files:
        s3.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a missing folder or an unreachable store is one line on stderr and exit 1."""
    logging.basicConfig(level=logging.WARNING, format="bucket.py: %(message)s")
    log.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(prog="scripts/bucket.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("create").add_argument("bucket")
    pull = commands.add_parser("download")
    pull.add_argument("bucket")
    pull.add_argument("folder", type=Path)
    push = commands.add_parser("upload")
    push.add_argument("folder", type=Path)
    push.add_argument("bucket")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            create(args.bucket)
        elif args.command == "download":
            log.info("%d objects from s3://%s to %s", download(args.bucket, args.folder), args.bucket, args.folder)
        else:
            if not args.folder.is_dir():
                raise ValueError(f"{args.folder}: no such folder")
            log.info("%d objects from %s to s3://%s", upload(args.folder, args.bucket), args.folder, args.bucket)
    except (BotoCoreError, ClientError, ValueError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
