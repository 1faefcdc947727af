"""Convert a folder of images into hvae's LMDB layout (documented in hvae/data.py).

    python scripts/make_lmdb.py --src images1024x1024 --dst data/ffhq256 --size 256

writes DST/train and DST/test, two LMDBs that ``--dataset lmdb`` (or
``celebahq256`` / ``ffhq256``) reads with ``--data DST``.  The split is
deterministic: the image paths are sorted and the last ``--test-fraction`` of
them are test (for FFHQ's 70,000 files and 0.1 this is NVAE's 63k/7k split),
or ``--split`` keeps the SRC/train and SRC/test folders as they are.
Greyscale images are stored with one channel, all others as RGB.
"""
from __future__ import annotations

import argparse
import io
import signal
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:
    from hvae import cli, data
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hvae import cli, data

PROG = "make_lmdb.py"
CHUNK = 1000  # images per write transaction


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--dst", required=True, help="output folder; gets train/ and test/")
    parser.add_argument("--size", type=cli.integer(1), default=None,
                        help="resize the shorter side to N and centre-crop N x N "
                             "(default: keep the size)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--test-fraction", "--test_fraction", type=float, default=data.TEST_FRACTION,
                     help="share of the sorted images (the last ones) that form the test split")
    how.add_argument("--split", action="store_true",
                     help="use the SRC/train and SRC/test folders as the two splits")
    parser.add_argument("--format", choices=("png", "raw"), default="png",
                        help="png (lossless, compact) or raw uint8 with a shape header (fast)")
    parser.add_argument("--workers", type=cli.integer(1), default=1,
                        help="processes encoding images")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace LMDBs that DST/train and DST/test already hold "
                             "(default: refuse)")
    args = parser.parse_args(argv)
    if not 0 <= args.test_fraction < 1:
        parser.error(f"argument --test-fraction: {args.test_fraction} is not allowed: "
                     "a number in [0, 1)")
    return args


def encode(path: Path, size: int | None, fmt: str) -> bytes:
    """One image file as an LMDB value (greyscale kept as 1 channel, else RGB)."""
    image = data.open_image(str(path), str(path))
    image = image.convert("L" if image.mode in ("1", "L", "LA", "La") else "RGB")
    if size:
        image = data.fit_image(image, size)
    if fmt == "raw":
        return data.encode_raw(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _ignore_ctrl_c() -> None:
    """In a worker: Ctrl-C is the main process's to handle (one line, no worker tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def write_lmdb(dst: Path, files: list[Path], *, size: int | None, fmt: str, workers: int) -> int:
    """Write ``files`` to a new LMDB at ``dst``; returns the number of images."""
    dst.mkdir(parents=True, exist_ok=True)
    env = data.open_lmdb(dst, write=True)
    job = partial(encode, size=size, fmt=fmt)
    pool = Pool(workers, initializer=_ignore_ctrl_c) if workers > 1 else None
    values = pool.imap(job, files, chunksize=16) if pool else map(job, files)
    try:
        txn = env.begin(write=True)
        for index, value in enumerate(tqdm(values, total=len(files), desc=str(dst), unit="img")):
            txn.put(data.lmdb_key(index), value)
            if (index + 1) % CHUNK == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.put(data.LMDB_LENGTH_KEY, str(len(files)).encode())
        txn.commit()
        env.sync()
    except BaseException:
        if pool:
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
        env.close()
    return len(files)


@cli.entry_point(PROG)  # bad input (arguments, unreadable images): one line, exit code 2
def main(argv=None) -> int:
    args = parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise cli.UsageError(f"--src {str(src)!r} is not a folder")
    cli.check_output_dir(dst, "--dst")
    if args.split:
        splits = {s: data.list_images(src / s) for s in data.SPLITS}
    else:
        files = data.list_images(src)
        splits = {s: data.split_files(files, s, args.test_fraction) for s in data.SPLITS}
    for split, files in splits.items():
        if not files:
            where = src / split if args.split else src
            raise cli.UsageError(f"--src: no {split} images found under {str(where)!r} "
                                 f"({', '.join(data.IMAGE_EXTENSIONS)})")
        cli.check_output_dir(dst / split, "--dst")
        if (dst / split / "data.mdb").exists() and not args.overwrite:
            raise cli.UsageError(f"--dst: {dst / split} already holds an LMDB: give another "
                                 "--dst, or --overwrite to replace it")
    if args.overwrite:
        for split in splits:
            remove_lmdb(dst / split)
    written = []
    try:
        for split, files in splits.items():
            written.append(dst / split)
            write_lmdb(dst / split, files, size=args.size, fmt=args.format, workers=args.workers)
            print(f"{split}: {len(files)} images -> {dst / split}")
    except BaseException:  # e.g. an unreadable image (DataError naming it): remove what this
        for folder in written:  # run wrote, so that the same command can simply be rerun
            remove_lmdb(folder)
        raise
    return 0


def remove_lmdb(folder: Path) -> None:
    for name in ("data.mdb", "lock.mdb"):
        (folder / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
