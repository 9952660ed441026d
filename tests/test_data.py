"""Data loaders (cifar10/cifar100 pickles, folder trees as directories or .tar.gz, Tiny-ImageNet), the
uint8 cache, batch augmentation and image-file decoding, checked against pixels written by the tests."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepreduce import data as data_mod
from deepreduce.data import Split, augment_batch, cache_dir, load_dataset, load_image_files, normalize, \
    parse_data_arg
from deepreduce.errors import UserError
from support.datasets import make_tar, random_images, write_cifar_pickle, write_image_tree
from support.env import CIFAR10_CLASSES, CIFAR10_TAR, PERSISTENT_CACHE

pytestmark = pytest.mark.usefixtures("deepreduce_env")


def nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)


def stats(images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (sample) std of [0, 1] pixels, in float64."""
    px = images_nhwc.astype(np.float64).reshape(-1, images_nhwc.shape[-1]) / 255.0
    return px.mean(axis=0), px.std(axis=0, ddof=1)


def assert_split(split: Split, images_nhwc: np.ndarray, labels) -> None:
    assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    assert torch.equal(split.images, nchw(images_nhwc))
    assert split.labels.tolist() == list(labels)


def cached_files() -> list[str]:
    d = cache_dir()
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# -- the real CIFAR-10 (folder tree in a .tar.gz) ------------------------------------------------------

@pytest.mark.slow  # decodes 60,000 JPEGs the first time (then cached)
def test_real_cifar10(cifar10):
    d = cifar10
    assert d.train.images.shape == (50_000, 3, 32, 32) and d.test.images.shape == (10_000, 3, 32, 32)
    assert d.train.images.dtype == torch.uint8
    assert d.classes == CIFAR10_CLASSES
    assert torch.bincount(d.train.labels).tolist() == [5000] * 10
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10
    assert (d.in_channels, d.input_size) == (3, 32)
    # The published CIFAR-10 training-set statistics (JPEG re-compression moves them a little).
    assert np.allclose(d.mean, [0.4914, 0.4822, 0.4465], atol=0.01)
    assert np.allclose(d.std, [0.2470, 0.2435, 0.2616], atol=0.01)
    # Pixels: decode a few archive members independently and find them at their sorted position.
    wanted = {"train/airplane/0003.jpg": ("train", 3, 0), "train/cat/1234.jpg": ("train", 3 * 5000 + 1234, 3),
              "test/truck/0999.jpg": ("test", 9999, 9)}
    with tarfile.open(CIFAR10_TAR) as tar:
        for member in tar:
            if member.name in wanted:
                split, index, label = wanted.pop(member.name)
                img = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                s = getattr(d, split)
                assert torch.equal(s.images[index], torch.from_numpy(img).permute(2, 0, 1)), member.name
                assert s.labels[index].item() == label
                if not wanted:
                    break
    assert not wanted
    # The decoded data lives in the persistent cache, never next to the (read-only) archive.
    entries = os.listdir(os.path.join(PERSISTENT_CACHE, "datasets"))
    assert any(e.startswith("folder-") and e.endswith(".pt") for e in entries)
    assert not Path(PERSISTENT_CACHE).resolve().is_relative_to(CIFAR10_TAR.parent.resolve())


# -- CIFAR python pickles --------------------------------------------------------------------------

def write_cifar10(root: Path, per_batch=3, n_test=4, seed=0):
    """A cifar-10-batches-py folder in the release format (bytes keys, N x 3072 rows of CHW pixels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_cifar_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        write_cifar_pickle(folder / f"data_batch_{i}", {b"batch_label": b"training batch %d" % i, b"data": x,
                                                        b"labels": y, b"filenames": [b"x.png"] * per_batch})
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test).tolist()
    write_cifar_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1", b"data": test_x, b"labels": test_y})
    to_nhwc = lambda x: x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    return folder, (to_nhwc(np.concatenate(train_x)), train_y), (to_nhwc(test_x), test_y)


def test_cifar10_pickles(tmp_path):
    folder, (train_x, train_y), (test_x, test_y) = write_cifar10(tmp_path)
    for path in (tmp_path, folder):  # the parent directory or the folder itself
        d = load_dataset(f"cifar10:{path}", progress=False)
        assert_split(d.train, train_x, train_y)
        assert_split(d.test, test_x, test_y)
        assert d.classes == CIFAR10_CLASSES
        mean, std = stats(train_x)
        assert np.allclose(d.mean, mean, atol=1e-5) and np.allclose(d.std, std, atol=1e-5)


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"class{i:02d}".encode() for i in range(100)]
    write_cifar_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    splits = {}
    for name, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine_y = rng.integers(0, 100, n).tolist()
        coarse_y = rng.integers(0, 20, n).tolist()
        write_cifar_pickle(folder / name, {b"data": x, b"fine_labels": fine_y, b"coarse_labels": coarse_y})
        splits[name] = (x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine_y)
    d = load_dataset(f"cifar100:{tmp_path}", progress=False)
    assert_split(d.train, *splits["train"])
    assert_split(d.test, *splits["test"])
    assert d.classes == [f"class{i:02d}" for i in range(100)]
    mean, std = stats(splits["train"][0])
    assert np.allclose(d.mean, mean, atol=1e-5) and np.allclose(d.std, std, atol=1e-5)


def test_cifar_resize(tmp_path):
    folder, _, _ = write_cifar10(tmp_path, per_batch=1, n_test=1)
    # Smooth images (a horizontal ramp, 4 levels per pixel) so the resized values are predictable.
    ramp = np.broadcast_to((np.arange(32) * 4).astype(np.uint8), (1, 3, 32, 32)).reshape(1, 3072)
    for i in range(1, 6):
        write_cifar_pickle(folder / f"data_batch_{i}", {b"data": ramp, b"labels": [i]})
    with pytest.raises(UserError, match="32x32 but the model expects 16x16: pass --resize"):
        load_dataset(f"cifar10:{tmp_path}", input_size=16, progress=False)
    d = load_dataset(f"cifar10:{tmp_path}", input_size=16, resize=True, progress=False)
    assert d.train.images.shape == (5, 3, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (1, 3, 16, 16)
    # Output column j covers input columns 2j and 2j+1: the ramp's value there is 8j + 2.
    expected = torch.arange(16) * 8 + 2
    assert (d.train.images[:, :, :, 1:-1].long() - expected[1:-1]).abs().max() <= 1
    assert d.train.labels.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "test_batch").unlink(), "test_batch is missing: a CIFAR python folder holds"),
    (lambda f: (f / "batches.meta").unlink(), "batches.meta is missing"),
    (lambda f: (f / "data_batch_3").write_bytes(b"garbage"), "data_batch_3 is not a CIFAR python pickle"),
    (lambda f: write_cifar_pickle(f / "data_batch_2", {b"labels": [1]}), "data_batch_2 is not a CIFAR batch"),
    (lambda f: write_cifar_pickle(f / "batches.meta", {b"other": 1}), "has no label_names"),
])
def test_cifar_malformed(tmp_path, damage, message):
    folder, _, _ = write_cifar10(tmp_path, per_batch=1, n_test=1)
    damage(folder)
    with pytest.raises(UserError, match=message) as info:
        load_dataset(f"cifar10:{tmp_path}", progress=False)
    assert "\n" not in str(info.value)


def test_cifar100_folder_is_not_cifar10(tmp_path):
    write_cifar10(tmp_path, per_batch=1, n_test=1)
    with pytest.raises(UserError, match="meta is missing"):
        load_dataset(f"cifar100:{tmp_path}", progress=False)


# -- folder trees ---------------------------------------------------------------------------------

SPLITS = {"train": {"cat": 3, "ant": 2, "dog": 4}, "test": {"ant": 1, "cat": 2, "dog": 1}}


def check_tree(d, truth, test_name="test"):
    assert d.classes == ["ant", "cat", "dog"] == truth["train"][2]
    assert_split(d.train, truth["train"][0], truth["train"][1])
    assert_split(d.test, truth[test_name][0], truth[test_name][1])
    mean, std = stats(truth["train"][0])
    assert np.allclose(d.mean, mean, atol=1e-5) and np.allclose(d.std, std, atol=1e-5)


def test_folder_directory(tmp_path):
    truth = write_image_tree(tmp_path / "outer" / "ds", SPLITS)
    d = load_dataset(f"folder:{tmp_path / 'outer' / 'ds'}", progress=False)
    check_tree(d, truth)
    assert (d.in_channels, d.input_size) == (3, 8)
    # A directory holding a single folder with the tree inside (an extracted archive) works too.
    d2 = load_dataset(f"folder:{tmp_path / 'outer'}", progress=False)
    check_tree(d2, truth)


@pytest.mark.parametrize("arcname", [".", "mydata"])
def test_folder_tar_gz(tmp_path, arcname):
    truth = write_image_tree(tmp_path / "ds", SPLITS)
    tar = make_tar(tmp_path / "ds", tmp_path / "ds.tar.gz", arcname)
    check_tree(load_dataset(f"folder:{tar}", progress=False), truth)


def test_folder_with_val_instead_of_test(tmp_path):
    truth = write_image_tree(tmp_path / "ds", {"train": SPLITS["train"], "val": SPLITS["test"]})
    check_tree(load_dataset(f"folder:{tmp_path / 'ds'}", progress=False), truth, "val")
    tar = make_tar(tmp_path / "ds", tmp_path / "ds.tgz")
    check_tree(load_dataset(f"folder:{tar}", progress=False), truth, "val")


def test_mean_std_come_from_the_train_split(tmp_path):
    root = tmp_path / "ds"
    truth = write_image_tree(root, {"train": {"a": 3, "b": 3}, "test": {"a": 1}})
    # Make the test images extreme: any leak of them into the statistics would show.
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(root / "test" / "a" / "0000.png")
    d = load_dataset(f"folder:{root}", progress=False)
    mean, std = stats(truth["train"][0])
    assert np.allclose(d.mean, mean, atol=1e-5) and np.allclose(d.std, std, atol=1e-5)
    both = np.concatenate([truth["train"][0], np.full((1, 8, 8, 3), 255, np.uint8)])
    assert not np.allclose(d.mean, stats(both)[0], atol=1e-3)


def test_grayscale_folder(tmp_path):
    truth = write_image_tree(tmp_path / "ds", SPLITS, channels=1)
    d = load_dataset(f"folder:{tmp_path / 'ds'}", progress=False)
    assert d.in_channels == 1 and d.train.images.shape == (9, 1, 8, 8)
    check_tree(d, truth)
    assert len(d.mean) == len(d.std) == 1


def test_mixed_gray_and_colour_is_rgb(tmp_path):
    root = tmp_path / "ds"
    write_image_tree(root, SPLITS)
    gray = random_images(np.random.default_rng(5), 1, 8, channels=1)[0]
    Image.fromarray(gray, mode="L").save(root / "train" / "ant" / "0000.png")
    d = load_dataset(f"folder:{root}", progress=False)
    assert d.in_channels == 3
    assert all(torch.equal(d.train.images[0, c], torch.from_numpy(gray)) for c in range(3))


def test_jpeg_folder_matches_pil(tmp_path):
    truth = write_image_tree(tmp_path / "ds", SPLITS, suffix=".jpg")
    d = load_dataset(f"folder:{tmp_path / 'ds'}", progress=False)
    assert d.train.labels.tolist() == truth["train"][1].tolist()
    first = np.array(Image.open(tmp_path / "ds" / "train" / "ant" / "0000.jpg").convert("RGB"))
    assert torch.equal(d.train.images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_wrong_size_refused_or_resized(tmp_path):
    write_image_tree(tmp_path / "ds", SPLITS, size=12)
    arg = f"folder:{tmp_path / 'ds'}"
    with pytest.raises(UserError) as info:
        load_dataset(arg, input_size=8, progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert "is 12x12 but the model expects 8x8" in msg and "--resize" in msg
    d = load_dataset(arg, input_size=8, resize=True, progress=False)
    assert d.train.images.shape == (9, 3, 8, 8) and d.test.images.shape == (4, 3, 8, 8)
    assert load_dataset(arg, progress=False).input_size == 12  # without a requested size: the data's own


def test_inconsistent_sizes_refused(tmp_path):
    root = tmp_path / "ds"
    write_image_tree(root, SPLITS, size=8)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "train" / "dog" / "0003.png")
    with pytest.raises(UserError, match="is 10x10 but the model expects 8x8"):
        load_dataset(f"folder:{root}", progress=False)
    assert load_dataset(f"folder:{root}", input_size=8, resize=True, progress=False).train.images.shape[-1] == 8


def test_non_square_images(tmp_path):
    root = tmp_path / "ds"
    write_image_tree(root, SPLITS, size=8)
    for split in ("train", "test"):
        for f in (root / split).glob("*/*.png"):
            Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(f)
    for resize in (False, True):  # no size to resize to: a clear error either way
        with pytest.raises(UserError, match="6 is not square|8x6, not square"):
            load_dataset(f"folder:{root}", resize=resize, progress=False)
    assert load_dataset(f"folder:{root}", input_size=4, resize=True, progress=False).input_size == 4


@pytest.mark.parametrize("build, message", [
    (lambda p: p.mkdir(), "expected an image-folder tree"),
    (lambda p: write_image_tree(p, {"train": {"a": 1}}), r"found splits \['train'\]"),
    (lambda p: write_image_tree(p, {"train": {"a": 1}, "test": {"a": 1, "zebra": 1}}),
     r"test/ has classes missing from train/: \['zebra'\]"),
    (lambda p: (write_image_tree(p, {"train": {"a": 2}, "test": {"a": 1}}),
                (p / "train" / "a" / "0001.png").write_bytes(b"not a png")), "train/a/0001.png is not a readable image"),
    (lambda p: (p.mkdir(), (p / "train").mkdir(), (p / "test").mkdir()), "found splits none"),
])
def test_folder_malformed(tmp_path, build, message):
    root = tmp_path / "ds"
    build(root)
    with pytest.raises(UserError, match=message) as info:
        load_dataset(f"folder:{root}", progress=False)
    assert "\n" not in str(info.value)


def test_not_a_tar(tmp_path):
    bad = tmp_path / "data.tar.gz"
    bad.write_bytes(b"\x1f\x8b definitely not gzip")
    with pytest.raises(UserError, match="is not a readable .tar.gz archive"):
        load_dataset(f"folder:{bad}", progress=False)
    write_image_tree(tmp_path / "ds", SPLITS)
    good = make_tar(tmp_path / "ds", tmp_path / "ok.tar.gz").read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="not a readable .tar.gz archive"):
        load_dataset(f"folder:{truncated}", progress=False)


@pytest.mark.parametrize("arg, message", [
    ("nosuchkind:/tmp", "is not KIND:PATH with KIND one of cifar10, cifar100, folder, tinyimagenet"),
    ("/tmp", "is not KIND:PATH"),
    ("folder:", "is not KIND:PATH"),
    ("folder:/no/such/dir", "--data path /no/such/dir does not exist"),
])
def test_bad_data_argument(arg, message):
    with pytest.raises(UserError, match=message):
        parse_data_arg(arg)
    with pytest.raises(UserError, match=message):
        load_dataset(arg)


# -- Tiny-ImageNet-200 -------------------------------------------------------------------------------

def write_tiny(root: Path, size=8, words=True):
    rng = np.random.default_rng(3)
    wnids = ["n02", "n01"]  # file order, not sorted order, defines the labels
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    if words:
        (root / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\tEuropean fire salamander\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            Image.fromarray(random_images(rng, 1, size)[0]).save(root / "train" / w / "images" / f"{w}_{i}.JPEG",
                                                                 format="JPEG")
    rows = []
    for i, w in enumerate(["n01", "n02", "n01"]):
        Image.fromarray(random_images(rng, 1, size)[0]).save(root / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        rows.append(f"val_{i}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def pil_chw(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)


def test_tinyimagenet(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    write_tiny(root)
    d = load_dataset(f"tinyimagenet:{root}", progress=False)
    assert d.classes == ["European fire salamander", "goldfish"]
    assert d.train.labels.tolist() == [0, 0, 1, 1]
    assert d.test.labels.tolist() == [1, 0, 1]
    assert torch.equal(d.train.images[2], pil_chw(root / "train" / "n01" / "images" / "n01_0.JPEG"))
    assert torch.equal(d.test.images[1], pil_chw(root / "val" / "images" / "val_1.JPEG"))
    assert d.train.images.shape == (4, 3, 8, 8)
    mean = d.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert np.allclose(d.mean, mean.numpy(), atol=1e-5)


def test_tinyimagenet_without_words_uses_wnids(tmp_path):
    write_tiny(tmp_path, words=False)
    assert load_dataset(f"tinyimagenet:{tmp_path}", progress=False).classes == ["n02", "n01"]


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "wnids.txt").unlink(), "missing wnids.txt; expected the Tiny-ImageNet-200 layout"),
    (lambda r: (r / "val" / "val_annotations.txt").unlink(), "missing val/val_annotations.txt"),
    (lambda r: (r / "wnids.txt").write_text("n01\nn02\nn03\n"), r"missing train/n03/images/"),
    (lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n"),
     "class n99 is not in wnids.txt"),
])
def test_tinyimagenet_malformed(tmp_path, damage, message):
    write_tiny(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message):
        load_dataset(f"tinyimagenet:{tmp_path}", progress=False)


# -- cache ---------------------------------------------------------------------------------------

def test_cache_hit_does_not_decode(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    truth = write_image_tree(root, SPLITS)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = load_dataset(f"folder:{root}", progress=False)
    files = cached_files()
    assert len(files) == 1 and files[0].startswith("folder-") and files[0].endswith(".pt")
    assert os.environ["DEEPREDUCE_CACHE"] == str(tmp_path / "cache")
    assert cache_dir() == str(tmp_path / "cache" / "datasets")
    # The cache never lives inside the dataset, and the dataset is left untouched.
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although the cache holds this dataset")
    monkeypatch.setattr(data_mod, "_decode", no_decoding)
    monkeypatch.setitem(data_mod._LOADERS, "folder", no_decoding)
    second = load_dataset(f"folder:{root}", progress=False)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert (second.classes, second.mean, second.std) == (first.classes, first.mean, first.std)
    check_tree(second, truth)
    assert cached_files() == files
    # Asking for the cached size, without resizing, is a hit too.
    load_dataset(f"folder:{root}", input_size=8, progress=False)


def test_cache_invalidated_when_data_changes(tmp_path):
    root = tmp_path / "ds"
    write_image_tree(root, SPLITS)
    load_dataset(f"folder:{root}", progress=False)
    target = root / "train" / "ant" / "0000.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d = load_dataset(f"folder:{root}", progress=False)
    assert (d.train.images[0] == 7).all()
    assert len(cached_files()) == 2


def test_damaged_cache_is_rebuilt(tmp_path):
    root = tmp_path / "ds"
    truth = write_image_tree(root, SPLITS)
    load_dataset(f"folder:{root}", progress=False)
    (path,) = cached_files()
    Path(cache_dir(), path).write_bytes(b"torn")
    check_tree(load_dataset(f"folder:{root}", progress=False), truth)
    assert torch.load(Path(cache_dir(), path), weights_only=True)["format"] == data_mod.CACHE_FORMAT


def test_resized_data_has_its_own_cache_entry(tmp_path):
    root = tmp_path / "ds"
    write_image_tree(root, SPLITS, size=12)
    assert load_dataset(f"folder:{root}", progress=False).input_size == 12
    assert load_dataset(f"folder:{root}", input_size=8, resize=True, progress=False).input_size == 8
    assert load_dataset(f"folder:{root}", progress=False).input_size == 12
    assert len(cached_files()) == 2


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPREDUCE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "deepreduce" / "datasets")


# -- augmentation -------------------------------------------------------------------------------------

def windows(img: np.ndarray, pad: int = 4) -> list[tuple[int, int, bool, np.ndarray]]:
    """Every (dy, dx, flipped, crop) the augmentation may produce from a C x H x W image."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [(dy, dx, False, crop), (dy, dx, True, crop[:, :, ::-1])]
    return out


def test_augment_batch_crops_and_flips():
    rng = np.random.default_rng(0)
    # Pixels in 1..255 so padding zeros are recognisable and every window is distinct.
    images = torch.from_numpy(rng.integers(1, 256, (48, 3, 10, 10), dtype=np.uint8))
    out = augment_batch(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = []
    for i in range(len(images)):
        matches = [(dy, dx, f) for dy, dx, f, crop in windows(images[i].numpy()) if np.array_equal(out[i].numpy(), crop)]
        assert len(matches) == 1, f"image {i} is not a zero-padded shifted window of its source"
        seen.append(matches[0])
    flips = [f for _, _, f in seen]
    shifts = {(dy, dx) for dy, dx, _ in seen}
    assert 0 < sum(flips) < len(flips)                      # both flipped and unflipped images
    assert len(shifts) > 10                                 # many different offsets
    assert any((out[i] == 0).any() for i in range(len(out)))  # some windows reach into the zero padding


def test_augment_batch_is_deterministic_per_seed():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment_batch(images, torch.Generator().manual_seed(7))
    b = augment_batch(images, torch.Generator().manual_seed(7))
    c = augment_batch(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    one = augment_batch(images[:, :1].contiguous(), torch.Generator().manual_seed(7))
    assert one.shape == (16, 1, 8, 8)


def test_split_subset_and_normalize():
    s = Split(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous(), torch.arange(10))
    sub = s.subset(4, seed=3)
    assert len(sub) == 4 and torch.equal(sub.labels, s.subset(4, seed=3).labels)
    assert torch.equal(sub.images[:, 0, 0, 0].long(), sub.labels)  # images and labels stay paired
    assert len(set(sub.labels.tolist())) == 4
    assert s.subset(10) is s and s.subset(99) is s
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    y = normalize(x, [0.5, 0.2], [0.5, 0.1])
    assert torch.allclose(y, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]), atol=1e-6)


# -- image files for inference --------------------------------------------------------------------

def test_load_image_files(tmp_path):
    rng = np.random.default_rng(2)
    rgb, gray = random_images(rng, 2, 8), random_images(rng, 1, 8, channels=1)
    paths = []
    for i, arr in enumerate(rgb):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(gray[0], mode="L").save(tmp_path / "g.png")
    x = load_image_files(paths, in_channels=3, input_size=8)
    assert x.dtype == torch.uint8 and torch.equal(x, nchw(rgb))
    g = load_image_files([str(tmp_path / "g.png")], in_channels=1, input_size=8)
    assert g.shape == (1, 1, 8, 8) and torch.equal(g[0, 0], torch.from_numpy(gray[0]))
    with pytest.raises(UserError, match="is 8x8 but the model expects 16x16"):
        load_image_files(paths, in_channels=3, input_size=16)
    assert load_image_files(paths, in_channels=3, input_size=16, resize=True).shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="does not exist"):
        load_image_files([str(tmp_path / "missing.png")], 3, 8)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="is not a readable image"):
        load_image_files([str(tmp_path / "bad.png")], 3, 8)
