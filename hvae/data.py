"""Datasets and loaders.

Every item is a float32 tensor [C, H, W] in [0, 1] (the image only, no label).
The data range and bit depth are set in one place, ``reduce_bits``, used by
training and evaluation alike: values lie on k / (2**num_x_bits - 1), or are
binarised when ``config.binary`` (training: a fresh Bernoulli draw on every
access; test: one fixed-seed draw per image, so evaluation is reproducible).

Sources (``config.dataset``; ``config.data`` is the ``--data DIR``):

- ``mnist_subset``: 5,000 real MNIST digits shipped with hvae (hvae/assets/mnist_5k.npz,
  origin and licence in hvae/assets/README.md); per digit the first 400 rows train,
  the last 100 test.
- ``mnist``: torchvision's raw IDX files, DIR/MNIST/raw/*-ubyte[.gz].
- ``cifar10``: torchvision's pickled batches, DIR/cifar-10-batches-py.
- ``imagenet32``: downsampled-ImageNet npz files (train_data_batch_1..10.npz, val_data.npz).
- ``celeba64``: torchvision's CelebA layout (img_align_celeba + list_eval_partition.txt),
  NVAE's 148x148 crop then a resize to image_size; or the split layout below.
- ``celebahq256``, ``ffhq256``, ``lmdb``, ``folder``: the split layout below.

Split layout: DIR/train and DIR/test (NVAE's DIR/train.lmdb and DIR/validation.lmdb
also work), each an LMDB or a folder of images.  Without them (folders only), all
images under DIR are sorted by path and the last 10% are the test split.

LMDB layout (written by scripts/make_lmdb.py): key b"length" holds the image
count as ASCII digits; key b"%08d" % i holds image i, either encoded (PNG/JPEG
bytes) or raw: b"RAW" + one byte C + uint16 little-endian H and W + H*W*C
uint8 values in H, W, C order.  NVAE's LMDBs (keys str(i), no b"length",
encoded or headerless square RGB bytes) are read too.  Environments open lazily
in each process (one shared environment per LMDB and process, closed before a
fork), so datasets pickle to DataLoader workers.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from hvae.errors import HvaeError

SPLITS = ("train", "test")
TEST_FRACTION = 0.1          # share of a plain image folder used as the test split
TEST_BINARIZE_SEED = 20200708  # fixed, so every run evaluates on the same binarised test set
SUBSET_TEST_PER_DIGIT = 100  # mnist_subset: the last 100 rows of each digit are test
MNIST_SUBSET_FILE = Path(__file__).resolve().parent / "assets" / "mnist_5k.npz"
CELEBA_BOX = (15, 40, 163, 188)  # NVAE's 148x148 crop of the 178x218 aligned CelebA images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm")
SPLIT_DIRS = {"train": ("train", "train.lmdb"), "test": ("test", "validation.lmdb")}
LMDB_LENGTH_KEY = b"length"
RAW_MAGIC = b"RAW"

@dataclass(frozen=True)
class DatasetSource:
    """A dataset's facts, in one registration (``register_dataset``): its reader,
    ``read(config, split) -> (images, labels or None)``; what ``--data DIR`` must hold
    and how to get it (the error of a missing or wrong ``--data`` says both; "DIR"
    stands for the folder); whether training flips its images left-right."""
    read: Callable
    expected: str = ""
    how_to_get: str = ""
    flip: bool = False


DATASETS: dict[str, DatasetSource] = {}


def register_dataset(name: str, read: Callable, *, expected: str = "", how_to_get: str = "",
                     flip: bool = False) -> None:
    """Make ``--dataset NAME`` available (the config accepts it, ``build_loader`` reads
    it).  ``read(config, split)`` returns the split's images (a uint8 array [N, C, H, W],
    or a sequence of [C, H, W] uint8 arrays) and their labels or None."""
    DATASETS[name] = DatasetSource(read, expected, how_to_get, flip)


class DataError(HvaeError, ValueError):
    """Data that is missing, unreadable or does not match the configuration."""


_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError,
                zipfile.BadZipFile)


@contextlib.contextmanager
def _reading(what, extra: tuple = ()):
    """Turn a failure to read a data file (truncated, corrupt, wrong format) into a
    ``DataError`` that names it (``what``: a path, or a path and key)."""
    try:
        yield
    except DataError:
        raise
    except (*_READ_ERRORS, *extra) as err:
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise DataError(f"cannot read {what}: {type(err).__name__}"
                        + (f": {detail}" if detail else "")) from None


# --------------------------------------------------------------------- values
def reduce_bits(x_uint8, num_bits: int) -> torch.Tensor:
    """Map uint8 values 0..255 to float32 in [0, 1] on the levels k / (2**num_bits - 1).

    The single place the data range and bit depth are set, so training and
    evaluation see exactly the same values (5 bits: 0, 1/31, ..., 1).
    """
    x = torch.as_tensor(x_uint8)
    if x.dtype != torch.uint8:
        raise TypeError(f"reduce_bits expects uint8 values, got {x.dtype}")
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits={num_bits} is not in 1..8")
    if num_bits < 8:
        x = torch.bitwise_right_shift(x, 8 - num_bits)
    return x.float() / (2 ** num_bits - 1)


def image_shape(config) -> tuple[int, int, int]:
    """(C, H, W) of the dataset's items under ``config``."""
    return (config.in_channels, config.image_size, config.image_size)


# --------------------------------------------------------------- the dataset
class ImageDataset(Dataset):
    """uint8 [C, H, W] images from ``source`` turned into the items the model sees."""

    def __init__(self, name: str, split: str, source, *, num_bits: int, binary: bool,
                 flip: bool, labels: np.ndarray | None = None):
        self.name, self.split, self.source = name, split, source
        self.num_bits, self.binary, self.flip = num_bits, binary, flip
        self.labels = labels  # kept for inspection only; items are images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = np.ascontiguousarray(self.source[index])
        x = reduce_bits(torch.from_numpy(image), 8 if self.binary else self.num_bits)
        if self.flip and torch.rand(()).item() < 0.5:
            x = x.flip(-1)
        if self.binary:
            x = _binarize(x, None if self.split == "train" else index)
        return x


def _binarize(x: torch.Tensor, index: int | None) -> torch.Tensor:
    """Bernoulli draw with p = x: fresh in training, seeded by the index for the test set."""
    if index is None:
        return torch.bernoulli(x)
    gen = torch.Generator().manual_seed(TEST_BINARIZE_SEED + index)
    return torch.bernoulli(x, generator=gen)


def build_dataset(config, split: str) -> ImageDataset:
    """The ``split`` ("train" or "test") of ``config.dataset``, checked against the config."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = config.dataset
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: one of {', '.join(DATASETS)}")
    registered = DATASETS[name]
    source, labels = registered.read(config, split)
    dataset = ImageDataset(name, split, source, num_bits=config.num_x_bits,
                           binary=config.binary, flip=split == "train" and registered.flip,
                           labels=labels)
    _check_dataset(dataset, config)
    return dataset


def _check_dataset(dataset: ImageDataset, config) -> None:
    """Fail early when the data is empty or its images do not fit the config."""
    where = f"dataset {dataset.name!r} ({dataset.split} split, --data {config.data or '-'})"
    if len(dataset) == 0:
        raise DataError(f"{where} has no images")
    shape = tuple(np.shape(dataset.source[0]))
    if shape != image_shape(config):
        raise DataError(
            f"{where} has images of shape {shape} (C, H, W) but the config asks for "
            f"{image_shape(config)} (in_channels={config.in_channels}, image_size="
            f"{config.image_size}); set --in_channels/--image_size to match the data")


# ------------------------------------------------------------------ samplers
class EpochSampler(DistributedSampler):
    """This rank's share of an order that is a pure function of (seed, epoch).

    With drop_last (training) each of the ``num_replicas`` ranks takes
    len // num_replicas items of one shuffled order; without it (evaluation)
    rank r takes items r, r + num_replicas, ...: no padding, so the shards are
    disjoint and cover the set exactly (their sizes may differ by one).
    Works without torch.distributed (num_replicas=1 for a single process).
    """

    def __init__(self, dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=drop_last)
        n = len(dataset)
        self.total_size = n - n % num_replicas if drop_last else n
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def order(self) -> list[int]:
        """The full order of this epoch (shared by all ranks)."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2 ** 63)
        return torch.randperm(n, generator=gen).tolist()

    def __iter__(self):
        return iter(self.order()[: self.total_size][self.rank:: self.num_replicas])


def build_loader(config, split: str, *, distributed: bool = False, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None, shuffle: bool | None = None,
                 drop_last: bool | None = None, device=None,
                 dataset: Dataset | None = None, max_images: int = 0) -> DataLoader:
    """A DataLoader over ``split``; ``loader.sampler.set_epoch(e)`` sets the (seeded) order.

    Training defaults to shuffle + drop_last, evaluation to neither.  With
    ``distributed`` each rank reads a disjoint shard.  ``dataset`` reuses an
    already built dataset; ``max_images`` > 0 keeps only its first images.
    Evaluation shards (``distributed`` without shuffle and drop_last) are
    disjoint and cover the set exactly: each image is evaluated once.
    """
    train = split == "train"
    dataset = build_dataset(config, split) if dataset is None else dataset
    if max_images > 0:
        dataset = Subset(dataset, range(min(max_images, len(dataset))))
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    batch_size = batch_size or config.batch_size
    if not distributed:
        rank, world_size = 0, 1
    elif world_size == 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                           seed=config.seed, drop_last=drop_last)
    if drop_last and len(sampler) < batch_size:
        raise DataError(
            f"dataset {config.dataset!r} ({split} split, --data {config.data or '-'}) has "
            f"{len(dataset)} images, {len(sampler)} per process with {world_size} process(es): "
            f"smaller than one batch of {batch_size}, and incomplete batches are dropped; "
            f"use a smaller --batch_size or more data")
    if device is None:
        pin = torch.cuda.is_available()
    else:
        pin = torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=config.num_workers, pin_memory=pin)


# ------------------------------------------------------- bundled MNIST subset
def mnist_subset_file() -> Path:
    """The bundled digits, hvae/assets/mnist_5k.npz (installed with the package)."""
    if not MNIST_SUBSET_FILE.is_file():
        raise DataError(f"dataset 'mnist_subset': the bundled file {MNIST_SUBSET_FILE} is "
                        "missing; reinstall hvae (pip install -e .)")
    return MNIST_SUBSET_FILE


@functools.lru_cache(maxsize=1)
def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]), read once per process."""
    path = mnist_subset_file()
    with _reading(path), np.load(path, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    return images, labels.astype(np.int64)


def mnist_subset_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Row indices of ``split``: per digit, the last 100 rows are test, the rest train."""
    parts = []
    for digit in np.unique(labels):
        rows = np.flatnonzero(labels == digit)
        cut = len(rows) - SUBSET_TEST_PER_DIGIT
        parts.append(rows[:cut] if split == "train" else rows[cut:])
    return np.sort(np.concatenate(parts))


def _mnist_subset(config, split):
    images, labels = load_mnist_subset()
    rows = mnist_subset_indices(labels, split)
    return images[rows][:, None], labels[rows]


# ------------------------------------------------------------ array datasets
def _data_root(config) -> Path:
    """The --data DIR; a clear error when it is unset or missing."""
    expected, how = DATASETS[config.dataset].expected, DATASETS[config.dataset].how_to_get
    if not config.data:
        raise DataError(f"dataset {config.dataset!r} needs --data DIR; expected {expected}. "
                        f"To get it: {how}")
    root = Path(config.data).expanduser()
    if not root.is_dir():
        raise _missing(config, root, "not a directory")
    return root


def _missing(config, root: Path, detail: str = "") -> DataError:
    expected, how = DATASETS[config.dataset].expected, DATASETS[config.dataset].how_to_get
    detail = f" ({detail})" if detail else ""
    expected, how = expected.replace("DIR", str(root)), how.replace("DIR", str(root))
    return DataError(f"dataset {config.dataset!r}: no usable data at --data {root}{detail}; "
                     f"expected {expected}. To get it: {how}")


def _first_existing(paths: Sequence[Path]) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), optionally gzipped, as a uint8 array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with _reading(path), opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise DataError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape).copy()


def _mnist(config, split):
    root = _data_root(config)
    prefix = "train" if split == "train" else "t10k"
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"]
        images = _first_existing([folder / n for n in names])
        if images is None:
            continue
        labels = _first_existing([folder / f"{prefix}-labels-idx1-ubyte{ext}" for ext in ("", ".gz")])
        return read_idx(images)[:, None], None if labels is None else read_idx(labels)
    raise _missing(config, root, f"no {prefix}-images-idx3-ubyte[.gz]")


def _cifar10(config, split):
    root = _data_root(config)
    folder = _first_existing([root / "cifar-10-batches-py"]) or root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing(config, root, f"missing {', '.join(missing)} in {folder}")
    images, labels = [], []
    for n in names:
        with _reading(folder / n, extra=(AttributeError, TypeError)):
            with open(folder / n, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch.get(b"labels", batch.get("labels", [])), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _imagenet32(config, split):
    root = _data_root(config)
    names = ([f"train_data_batch_{i}.npz" for i in range(1, 11)] if split == "train"
             else ["val_data.npz"])
    found, missing = [], []
    for n in names:
        path = _first_existing([root / n, *sorted(root.glob(f"*/{n}"))])
        (found if path else missing).append(path or n)
    if missing:
        raise _missing(config, root, f"missing {', '.join(missing)}")
    images, labels = [], []
    for path in found:
        with _reading(path), np.load(path) as npz:
            data = npz["data"]
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{path}: 'data' should be uint8 rows of 3072 = 3x32x32 values, "
                                f"found {data.dtype} {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(npz["labels"].astype(np.int64) if "labels" in npz.files else
                          np.zeros(len(data), np.int64))
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------- images
class Prepare:
    """Decoded PIL image -> uint8 [C, H, W] of the configured channels and size.

    ``resize`` fits any size (shorter side scaled, centre crop); otherwise the
    size must already match.  ``celeba`` first applies NVAE's 148x148 crop to
    178x218 aligned CelebA images.
    """

    def __init__(self, channels: int, size: int, *, resize: bool, celeba: bool = False):
        self.channels, self.size, self.resize, self.celeba = channels, size, resize, celeba

    def __call__(self, image: Image.Image, where: str) -> np.ndarray:
        array = _to_channels(image, self.channels, where)
        image = Image.fromarray(array)
        if self.celeba and image.size == (178, 218):
            image = image.crop(CELEBA_BOX)
        if self.resize:
            image = fit_image(image, self.size)
        elif image.size != (self.size, self.size):
            raise DataError(f"{where} is {image.size[0]}x{image.size[1]} but image_size="
                            f"{self.size}; rebuild it at that size (scripts/make_lmdb.py --size) "
                            f"or set --image_size")
        array = np.array(image, dtype=np.uint8)  # a writable copy for torch.from_numpy
        return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _to_channels(image: Image.Image, channels: int, where: str) -> np.ndarray:
    """[H, W] (1 channel) or [H, W, 3] uint8; a colour image never silently becomes grey."""
    if channels == 3:
        return np.asarray(image.convert("RGB"))
    if image.mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DataError(f"{where}: {image.mode} images (16-bit/float) are not supported; "
                        f"save 8-bit greyscale")
    rgb = np.asarray(image.convert("RGB"))
    if (rgb == rgb[..., :1]).all():  # a grey image stored as colour
        return np.ascontiguousarray(rgb[..., 0])
    raise DataError(f"{where} is a colour image (mode {image.mode}) but in_channels=1; "
                    f"set --in_channels 3 or convert the images to greyscale")


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Centre square crop then resize to size x size (= shorter side to size + centre crop)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return image


def open_image(data, where: str) -> Image.Image:
    """Decode a file path or encoded bytes; an unreadable image names its source."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):  # PIL's message repeats the path or a repr
            err = "not an image file, or a corrupt one"
        raise DataError(f"cannot read image {where}: {err}") from None


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by path."""
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def split_files(files: Sequence, split: str, test_fraction: float = TEST_FRACTION) -> list:
    """Deterministic split of a sorted list: the last ceil(fraction * n) items are test."""
    num_test = math.ceil(test_fraction * len(files))
    cut = len(files) - num_test
    return list(files[:cut] if split == "train" else files[cut:])


class FileImages:
    """Image files decoded on access (only paths are stored, so it pickles cheaply)."""

    def __init__(self, files: Sequence[Path], prepare: Prepare):
        self.files, self.prepare = [str(f) for f in files], prepare

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.files[index]
        return self.prepare(open_image(path, path), path)


# --------------------------------------------------------------------- LMDB
def lmdb_key(index: int) -> bytes:
    return b"%08d" % index


def encode_raw(array: np.ndarray) -> bytes:
    """Our raw LMDB value: b"RAW", C (1 byte), H and W (uint16 LE), then H*W*C bytes (HWC)."""
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    h, w, c = array.shape
    return RAW_MAGIC + bytes([c]) + struct.pack("<HH", h, w) + array.tobytes()


def decode_value(value: bytes, where: str) -> Image.Image:
    """An LMDB value (PNG/JPEG bytes, our raw format or NVAE's raw square RGB) as a PIL image."""
    if value is None:
        raise DataError(f"{where} is missing")
    if value[:3] == RAW_MAGIC and len(value) >= 8:
        c, (h, w) = value[3], struct.unpack("<HH", value[4:8])
        if len(value) != 8 + h * w * c or c not in (1, 3):
            raise DataError(f"{where}: raw value of {len(value)} bytes does not match its "
                            f"header {h}x{w}x{c}")
        array = np.frombuffer(value, np.uint8, offset=8).reshape(h, w, c)
        return Image.fromarray(array[..., 0] if c == 1 else array)
    if value[:4] == b"\x89PNG" or value[:2] == b"\xff\xd8":
        return open_image(bytes(value), where)
    size = math.isqrt(len(value) // 3)
    if 3 * size * size != len(value):
        raise DataError(f"{where}: {len(value)} bytes are neither an encoded image, our raw "
                        f"format nor square RGB bytes")
    return Image.fromarray(np.frombuffer(value, np.uint8).reshape(size, size, 3))


def lmdb_package():
    """The ``lmdb`` package, imported when an LMDB is first opened (it is an extra)."""
    try:
        import lmdb
    except ImportError:
        raise DataError("LMDBs need the lmdb package: pip install 'hvae[lmdb]'") from None
    return lmdb


def open_lmdb(path, write: bool = False, map_size: int = 1 << 40):
    """Open an LMDB environment: read-only without locks for reading, after
    ``check_lmdb_size``."""
    lmdb = lmdb_package()
    if write:
        return lmdb.open(str(path), map_size=map_size, subdir=True)
    check_lmdb_size(path)
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)


LMDB_MAGIC = 0xBEEFC0DE


def check_lmdb_size(folder) -> None:
    """A ``DataError`` naming ``folder/data.mdb`` when the file is shorter than its own
    header says (a truncated copy).  LMDB maps the file into memory, and a read past its
    end kills the process with SIGBUS instead of raising.  The header is LMDB's (0.9)
    meta page: the newer of two copies (pages 0 and 1) gives the last page in use; the
    page size is stored in page 0.  A file this does not recognise is left to lmdb."""
    path = Path(folder) / "data.mdb"
    try:
        with open(path, "rb") as f:
            head, size = f.read(2 * 65536 + 152), os.fstat(f.fileno()).st_size
    except OSError:
        return  # missing or unreadable: lmdb.open says so
    metas = []
    page_size = struct.unpack_from("=I", head, 40)[0] if len(head) >= 152 else 0
    for offset in (0, page_size):
        if page_size and len(head) >= offset + 152:
            magic, version = struct.unpack_from("=II", head, offset + 16)
            if magic == LMDB_MAGIC and version == 1:
                metas.append(struct.unpack_from("=QQ", head, offset + 136))  # last page, txn id
    if not metas:
        return
    last_page = max(metas, key=lambda m: m[1])[0]
    needed = (last_page + 1) * page_size
    if size < needed:
        raise DataError(f"LMDB file {path} is truncated: {size} bytes, but its header says "
                        f"{needed} ({last_page + 1} pages of {page_size}); copy it again, or "
                        "rebuild it with scripts/make_lmdb.py")


_READERS: dict[str, object] = {}  # this process's open read-only environments, by real path


def lmdb_reader(path) -> object:
    """The process's one read-only environment for ``path`` (LMDB allows one per process)."""
    key = os.path.realpath(path)
    if key not in _READERS:
        _READERS[key] = open_lmdb(key)
    return _READERS[key]


def close_readers() -> None:
    """Close the cached environments: a forked child (a DataLoader worker) cannot open
    an LMDB its parent holds open, so this runs before every fork; they reopen lazily."""
    while _READERS:
        _READERS.popitem()[1].close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=close_readers)


class LMDBImages:
    """Images in an LMDB, read through ``lmdb_reader`` (only the path pickles to workers)."""

    def __init__(self, path: Path, prepare: Prepare):
        lmdb = lmdb_package()
        self.path, self.prepare = str(path), prepare
        with _reading(f"LMDB {self.path}", extra=(lmdb.Error,)):
            env = lmdb_reader(self.path)
            with env.begin() as txn:
                length = txn.get(LMDB_LENGTH_KEY)
            self.nvae_keys = length is None  # NVAE's layout: keys str(i), no length key
            self.length = env.stat()["entries"] if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def key(self, index: int) -> bytes:
        return str(index).encode() if self.nvae_keys else lmdb_key(index)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.length:
            raise IndexError(index)
        lmdb = lmdb_package()
        key = self.key(index)
        where = f"{self.path} key {key.decode()}"
        with _reading(where, extra=(lmdb.Error,)):
            with lmdb_reader(self.path).begin() as txn:
                value = txn.get(key)
        return self.prepare(decode_value(value, where), where)


def _split_images(config, split, *, folders: bool = True, lmdb_resize: bool = False,
                  celeba: bool = False):
    """DIR/train|test (LMDB or folder), NVAE's *.lmdb names, or one folder split by path."""
    root = _data_root(config)
    channels, size = config.in_channels, config.image_size
    in_folder = Prepare(channels, size, resize=True, celeba=celeba)
    in_lmdb = Prepare(channels, size, resize=lmdb_resize, celeba=celeba)
    present = {s: _first_existing([root / d for d in SPLIT_DIRS[s]]) for s in SPLITS}
    if any(present.values()):
        path = present[split]
        if path is None:
            raise _missing(config, root, f"found {present['train'] or present['test']} but no "
                                         f"{' or '.join(SPLIT_DIRS[split])} next to it")
        if (path / "data.mdb").is_file():
            return LMDBImages(path, in_lmdb), None
        if not folders:
            raise _missing(config, root, f"{path} is not an LMDB (no data.mdb)")
        files = list_images(path)
    elif folders:
        files = split_files(list_images(root), split)
    else:
        raise _missing(config, root)
    if not files:
        raise _missing(config, root, f"no {split} images ({', '.join(IMAGE_EXTENSIONS)})")
    return FileImages(files, in_folder), None


def _celeba_partition(folder: Path) -> dict[str, int]:
    partition = {}
    path = folder / "list_eval_partition.txt"
    with _reading(path):
        for line in path.read_text().split("\n"):
            if line.strip():
                name, part = line.split()[:2]
                partition[name] = int(part)
    return partition


def _celeba64(config, split):
    """torchvision layout (train: partition 0; test: partition 1, the validation set NVAE
    reports on), else the split layout; always NVAE's crop, then a resize to image_size."""
    root = _data_root(config)
    for folder in (root / "celeba", root):
        images = folder / "img_align_celeba"
        if images.is_dir() and (folder / "list_eval_partition.txt").is_file():
            want = 0 if split == "train" else 1
            names = sorted(n for n, p in _celeba_partition(folder).items() if p == want)
            prepare = Prepare(config.in_channels, config.image_size, resize=True, celeba=True)
            return FileImages([images / n for n in names], prepare), None
    return _split_images(config, split, lmdb_resize=True, celeba=True)


# The datasets: reader, what --data holds and how to get it, and the flip of training images.
register_dataset("mnist_subset", _mnist_subset)  # bundled: no --data
register_dataset(
    "mnist", _mnist, flip=False,
    expected="DIR/MNIST/raw/train-images-idx3-ubyte and t10k-images-idx3-ubyte (or .gz; "
             "labels files optional)",
    how_to_get="python -c \"import torchvision; torchvision.datasets.MNIST('DIR', download=True)\"")
register_dataset(
    "cifar10", _cifar10, flip=True,
    expected="DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}",
    how_to_get="python -c \"import torchvision; torchvision.datasets.CIFAR10('DIR', download=True)\""
               " (or unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into DIR)")
register_dataset(
    "celeba64", _celeba64, flip=True,
    expected="DIR/celeba/img_align_celeba/*.jpg + DIR/celeba/list_eval_partition.txt, "
             "or DIR/train + DIR/test (LMDBs or image folders)",
    how_to_get="python -c \"import torchvision; torchvision.datasets.CelebA('DIR', split='all', "
               "download=True)\" (or get img_align_celeba.zip and list_eval_partition.txt from "
               "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html)")
register_dataset(
    "imagenet32", _imagenet32, flip=True,
    expected="DIR/train_data_batch_1..10.npz and DIR/val_data.npz (also one folder down)",
    how_to_get="download 'Train(32x32)' and 'Val(32x32)' npz archives of Downsampled ImageNet "
               "from https://image-net.org/download-images.php and unpack them into DIR")
register_dataset(
    "celebahq256", _split_images, flip=True,
    expected="DIR/train + DIR/test LMDBs (or image folders), 256x256 images",
    how_to_get="get CelebA-HQ (https://github.com/tkarras/progressive_growing_of_gans) and run "
               "python scripts/make_lmdb.py --src IMAGES --dst DIR --size 256")
register_dataset(
    "ffhq256", _split_images, flip=True,
    expected="DIR/train + DIR/test LMDBs (or image folders), 256x256 images",
    how_to_get="get FFHQ (https://github.com/NVlabs/ffhq-dataset) and run "
               "python scripts/make_lmdb.py --src images1024x1024 --dst DIR --size 256")
register_dataset(
    "lmdb", functools.partial(_split_images, folders=False), flip=False,
    expected="DIR/train + DIR/test LMDBs",
    how_to_get="python scripts/make_lmdb.py --src IMAGE_FOLDER --dst DIR --size N")
register_dataset(
    "folder", _split_images, flip=False,
    expected="image files under DIR (or DIR/train + DIR/test)",
    how_to_get=f"put images ({', '.join(IMAGE_EXTENSIONS)}) in DIR")
