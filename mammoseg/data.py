"""The preprocessed dataset's API: file names, the class list, reading the index and loading examples.

Reads what `mammoseg preprocess` wrote (index.parquet, dataset.json, images/, masks/, native_masks/)
and writes nothing. train, evaluate, export and register import it; nothing imports a stage module to
read data. Numpy and pandas only, so DataLoader workers and the preprocess pool stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mammoseg.errors import UserError

# The lesion classes, in mask-channel and network-output order. Every mask, metric, overlay and
# flag derives from this tuple.
CLASSES = ("mass", "calcification")
SPLITS = ("train", "val", "test")
INDEX_FILE = "index.parquet"
CONTRACT_FILE = "dataset.json"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
# Ingest's full-resolution masks, copied byte for byte: evaluate and register score on the DICOM grid
# from the dataset alone.
NATIVE_MASKS_DIR = "native_masks"
# Stored images are uint16: value / IMAGE_SCALE is the normalised intensity in [0, 1].
IMAGE_SCALE = 65535


def mask_path(masks_dir: Path, image_id: str, lesion_class: str) -> Path:
    """Return where the full-resolution mask of one class of one image lives (ingest's layout)."""
    return masks_dir / f"{image_id}_{lesion_class}.png"


def getter(record: Any) -> Callable[[str], Any]:
    """Return a field reader for an index row: a namedtuple (itertuples), a mapping or a pandas Series."""
    if hasattr(record, "_fields"):
        return lambda name: getattr(record, name)
    return record.__getitem__


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Pack (C, H, W) bool masks into (H, W) uint8 bit planes: bit i is CLASSES[i]."""
    packed = np.zeros(masks.shape[1:], np.uint8)
    for bit, plane in enumerate(masks):
        packed |= plane.astype(np.uint8) << bit
    return packed


def unpack_masks(packed: np.ndarray) -> np.ndarray:
    """Unpack (H, W) uint8 bit planes into (C, H, W) uint8 0/1 masks in CLASSES order."""
    return np.stack([(packed >> bit) & 1 for bit in range(len(CLASSES))]).astype(np.uint8)


def read_dataset(dataset_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read the preprocessed dataset's index and preprocessing contract.

    Raises:
        UserError: the folder is not a preprocessed dataset.
    """
    index_path, contract_path = dataset_dir / INDEX_FILE, dataset_dir / CONTRACT_FILE
    try:
        index = pd.read_parquet(index_path)
        contract = json.loads(contract_path.read_text())
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename}: missing (is {dataset_dir} written by `mammoseg preprocess`?)") \
            from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{index_path}: unreadable dataset index ({str(exc)[:200]})") from None
    return index, contract


def load_example(dataset_dir: str | Path, index_row: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read one example of a preprocessed dataset (numpy only, for DataLoader workers).

    Args:
        dataset_dir: the folder holding index.parquet.
        index_row: its row for the image (a pandas Series, a mapping or a namedtuple from itertuples)
            with `image_path` and `mask_path` relative to dataset_dir.

    Returns:
        image: (channels, H, W) float32 in [0, 1] (channels 1, or 2 with the block-maximum channel).
        mask: (C, H, W) uint8 0/1, channels in CLASSES order.
    """
    get = getter(index_row)
    root = Path(dataset_dir)
    # mmap: only the pages read are loaded; the division makes the one float32 copy needed.
    image = np.load(root / get("image_path"), mmap_mode="r")
    packed = np.load(root / get("mask_path"), mmap_mode="r")
    image = image.astype(np.float32) / np.float32(IMAGE_SCALE)
    return (image[None] if image.ndim == 2 else image), unpack_masks(np.asarray(packed))


def load_examples(dataset_dir: Path, rows: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """Load the examples of some index rows, typed for inference and scoring.

    Returns:
        (image (channels, H, W) float32 in [0, 1], mask (C, H, W) bool) per row.
    """
    return [(np.asarray(image, np.float32), np.asarray(mask, bool))
            for image, mask in (load_example(dataset_dir, row) for _, row in rows.iterrows())]


def read_native_masks(dataset_dir: Path, index_row: Any) -> np.ndarray:
    """Read one image's ground truth on its DICOM grid, as ingest drew it.

    Returns:
        (C, rows, columns) bool, channels in CLASSES order.

    Raises:
        UserError: a mask is missing or unreadable (a dataset written before native masks existed).
    """
    get = getter(index_row)
    shape = (int(get("rows")), int(get("columns")))
    planes = []
    for name in CLASSES:
        path = mask_path(Path(dataset_dir) / NATIVE_MASKS_DIR, str(get("image_id")), name)
        try:
            with Image.open(path) as image:
                plane = np.array(image).astype(bool, copy=False)
        except FileNotFoundError:
            raise UserError(f"{path}: native mask missing (re-run `mammoseg preprocess`)") from None
        except OSError as exc:
            raise UserError(f"{path}: unreadable mask PNG ({exc})") from None
        if plane.shape != shape:
            raise UserError(f"{path}: mask is {plane.shape[0]}x{plane.shape[1]}, the index says "
                            f"{shape[0]}x{shape[1]}")
        planes.append(plane)
    return np.stack(planes)


class ExampleDataset:
    """The images and masks of one split, a map-style dataset for torch's DataLoader.

    Items: (image (1, H, W) float32 in [0, 1], mask (C, H, W) float32 in {0, 1}); the DataLoader's
    default collate turns them into tensors, so this module needs no torch.
    """

    def __init__(self, dataset_dir: Path, rows: pd.DataFrame) -> None:
        self.dataset_dir = dataset_dir
        self.rows = rows.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = load_example(self.dataset_dir, self.rows.iloc[index])
        return np.asarray(image, np.float32), np.asarray(mask, np.float32)
