"""Datasets: one ``--data KIND:PATH`` argument, decoded once into a uint8 cache, held in memory.

Kinds: ``cifar10:DIR`` / ``cifar100:DIR`` (the python-pickle folders), ``folder:PATH`` (an
image-folder tree ``train/<class>/*`` + ``test/<class>/*`` or ``val/<class>/*``, as a directory
or a .tar.gz), ``tinyimagenet:DIR`` (the Tiny-ImageNet-200 layout).

Training speed on a 2-core CPU is the point of the design: a split is one uint8 NCHW tensor and
augmentation (random crop with 4-pixel padding, horizontal flip) runs on whole batches.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .checkpoint import atomic_torch_save
from .errors import UserError

CACHE_ENV = "DEEPREDUCE_CACHE"
CACHE_FORMAT = 1
DATA_KINDS = ("cifar10", "cifar100", "folder", "tinyimagenet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> "Split":
        """A fixed random subset of n examples (the whole split if n >= len)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: list[float]  # per channel, on [0, 1] pixels, from the training split
    std: list[float]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def input_size(self) -> int:
        return self.train.images.shape[2]


# -- public entry points --------------------------------------------------------------------

def parse_data_arg(arg: str) -> tuple[str, str]:
    kind, sep, path = arg.partition(":")
    if not sep or kind not in DATA_KINDS or not path:
        raise UserError(f"--data {arg!r} is not KIND:PATH with KIND one of {', '.join(DATA_KINDS)} "
                        "(e.g. cifar10:data/ after `deepreduce data download cifar10 data/`)")
    if not os.path.exists(path):
        raise UserError(f"--data path {path} does not exist")
    return kind, path


def cache_dir() -> str:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deepreduce")
    return os.path.join(base, "datasets")


def load_dataset(arg: str, input_size: int | None = None, resize: bool = False,
                 progress: bool = True) -> Dataset:
    """Load (from the cache when possible) the dataset named by a ``--data`` argument.

    Images whose size differs from `input_size` are resized when `resize` is set, otherwise
    refused. With `input_size` None, the size of the data is used (all images must agree).
    """
    kind, path = parse_data_arg(arg)
    key = _cache_key(kind, path, input_size if resize else None)
    cached = os.path.join(cache_dir(), key + ".pt")
    if os.path.isfile(cached):
        try:
            raw = torch.load(cached, weights_only=True)
            data = _from_cache(raw, arg)
        except Exception:
            data = None  # a stale or damaged cache entry is rebuilt below
        if data is not None:
            if input_size is None or data.input_size == input_size:
                return data
            if not resize:
                raise UserError(f"images in {arg} are {data.input_size}x{data.input_size} but the model expects "
                                f"{input_size}x{input_size}: pass --resize to resize them")
    fit = _SizeFit(input_size, resize)
    train, test, classes = _LOADERS[kind](path, fit, progress)
    data = _assemble(arg, train, test, classes)
    atomic_torch_save(_to_cache(data), cached)
    return data


def load_image_files(paths: list[str], in_channels: int, input_size: int, resize: bool = False) -> torch.Tensor:
    """Decode image files (PNG/JPEG/...) into a uint8 N x C x H x W tensor for inference."""
    fit = _SizeFit(input_size, resize)
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"image {p} does not exist")
        with open(p, "rb") as f:
            arr, _gray = _decode(f.read(), p, fit, mode="L" if in_channels == 1 else "RGB")
        out.append(arr)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad`-pixel zero padding and random horizontal flip, for a whole batch."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


# -- decoding -------------------------------------------------------------------------------

@dataclass
class _SizeFit:
    """The size rule: resize to `size` when allowed, else refuse images of another size."""
    size: int | None
    resize: bool

    def apply(self, img: Image.Image, where: str) -> Image.Image:
        if self.size is None:  # no size asked for: the first image sets it, so it must be square
            if img.size[0] != img.size[1]:
                raise UserError(f"image {where} is {img.size[0]}x{img.size[1]}, not square: "
                                "pass --input-size N --resize to resize it")
            self.size = img.size[0]
        if img.size != (self.size, self.size):
            if not self.resize:
                raise UserError(f"image {where} is {img.size[0]}x{img.size[1]} but the model expects "
                                f"{self.size}x{self.size}: pass --resize to resize it")
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return img


def _decode(blob: bytes, where: str, fit: _SizeFit, mode: str = "RGB") -> tuple[np.ndarray, bool]:
    """-> (H x W x channels uint8 array in `mode` (RGB or L), whether the source was grayscale)."""
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{where} is not a readable image ({exc})") from None
    gray = img.mode in GRAY_MODES
    img = fit.apply(img.convert(mode), where)
    return np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1), gray


def _decode_all(items, total: int, desc: str, fit: _SizeFit, progress: bool):
    """items yields (blob, label, where) -> (N x H x W x 3 uint8, labels, all_gray)."""
    arrays, labels, all_gray = [], [], True
    for blob, label, where in tqdm(items, total=total, desc=desc, unit="img", disable=not progress,
                                   mininterval=1.0):
        arr, gray = _decode(blob, where, fit)
        arrays.append(arr)
        labels.append(label)
        all_gray &= gray
    if not arrays:
        raise UserError(f"no images found for {desc}")
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), all_gray


def _nhwc_split(arrays: np.ndarray, labels: np.ndarray, gray: bool) -> Split:
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    images = images[:, :1] if gray else images
    return Split(images.contiguous(), torch.from_numpy(labels))


# -- folder trees (directory or .tar.gz) ------------------------------------------------------

def _load_folder(path: str, fit: _SizeFit, progress: bool):
    entries = _tar_entries(path) if os.path.isfile(path) else _dir_entries(path)
    by_split: dict[str, list] = {}
    for split, cls, name, read in entries:
        by_split.setdefault(split, []).append((cls, name, read))
    test_name = "test" if "test" in by_split else "val"
    if "train" not in by_split or test_name not in by_split:
        raise UserError(f"{path}: expected an image-folder tree train/<class>/* and test/<class>/* "
                        f"(or val/<class>/*); found splits {sorted(by_split) or 'none'}")
    classes = sorted({cls for cls, _, _ in by_split["train"]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _, _ in by_split[test_name]} - set(index))
    if unknown:
        raise UserError(f"{path}: {test_name}/ has classes missing from train/: {unknown}")
    splits = []
    for split in ("train", test_name):
        items = sorted(by_split[split], key=lambda e: (e[0], e[1]))
        gen = ((read(), index[cls], f"{split}/{cls}/{name}") for cls, name, read in items)
        splits.append(_decode_all(gen, len(items), f"decode {split}", fit, progress))
    gray = splits[0][2] and splits[1][2]
    return _nhwc_split(*splits[0][:2], gray), _nhwc_split(*splits[1][:2], gray), classes


def _tar_entries(path: str):
    """Yields (split, class, file name, reader) from a tar(.gz) holding a folder tree."""
    try:
        tar = tarfile.open(path, "r:*")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .tar.gz archive ({exc})") from None
    # Read every file once in archive order (random access into a .gz is quadratic).
    blobs = {}
    for m in members:
        parts = _split_parts(m.name)
        if m.isfile() and parts:
            blobs[m.name] = tar.extractfile(m).read()
    tar.close()
    for name, blob in blobs.items():
        split, cls, fname = _split_parts(name)
        yield split, cls, fname, (lambda b=blob: b)


def _dir_entries(path: str):
    root = _find_root(path)
    for split in ("train", "test", "val"):
        sdir = os.path.join(root, split)
        if not os.path.isdir(sdir):
            continue
        for cls in sorted(os.listdir(sdir)):
            cdir = os.path.join(sdir, cls)
            if not os.path.isdir(cdir):
                continue
            for fname in sorted(os.listdir(cdir)):
                if fname.lower().endswith(IMAGE_SUFFIXES):
                    yield split, cls, fname, (lambda p=os.path.join(cdir, fname): _read_file(p))


def _split_parts(name: str):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) >= 3 and parts[-3] in ("train", "test", "val") and parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return parts[-3], parts[-2], parts[-1]
    return None


def _find_root(path: str) -> str:
    if os.path.isdir(os.path.join(path, "train")):
        return path
    subdirs = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
    if len(subdirs) == 1 and os.path.isdir(os.path.join(path, subdirs[0], "train")):
        return os.path.join(path, subdirs[0])
    raise UserError(f"{path}: expected an image-folder tree with train/<class>/* and test/<class>/*")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- CIFAR python pickles --------------------------------------------------------------------

def _load_cifar(path: str, fit: _SizeFit, progress: bool, hundred: bool):
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    root = os.path.join(path, folder) if os.path.isdir(os.path.join(path, folder)) else path
    names = (["train"], ["test"], "meta", "fine_label_names", b"fine_labels") if hundred else \
        ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "label_names", b"labels")
    train_files, test_files, meta_file, names_key, labels_key = names
    expected = ", ".join(train_files + test_files + [meta_file])
    classes = _cifar_classes(os.path.join(root, meta_file), names_key, expected)
    splits = []
    for files in (train_files, test_files):
        data, labels = [], []
        for fname in files:
            batch = _unpickle(os.path.join(root, fname), expected)
            try:
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch[labels_key])
            except (KeyError, ValueError) as exc:
                raise UserError(f"{root}/{fname} is not a CIFAR batch (missing or bad {exc})") from None
        images = np.concatenate(data)
        splits.append(Split(_fit_array(torch.from_numpy(images), fit, f"{root}/{files[0]}"),
                            torch.tensor(labels, dtype=torch.int64)))
    return splits[0], splits[1], classes


def _cifar_classes(meta_path: str, key: str, expected: str) -> list[str]:
    meta = _unpickle(meta_path, expected)
    raw = meta.get(key.encode(), meta.get(key))
    if raw is None:
        raise UserError(f"{meta_path} has no {key}: expected the CIFAR python release ({expected})")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in raw]


def _unpickle(path: str, expected: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: a CIFAR python folder holds {expected}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise UserError(f"{path} is not a CIFAR python pickle ({type(exc).__name__})") from None


def _fit_array(images: torch.Tensor, fit: _SizeFit, where: str) -> torch.Tensor:
    size = images.shape[-1]
    if fit.size is None or fit.size == size:
        fit.size = size
        return images.contiguous()
    if not fit.resize:
        raise UserError(f"images in {where} are {size}x{size} but the model expects "
                        f"{fit.size}x{fit.size}: pass --resize to resize them")
    out = F.interpolate(images.float(), size=(fit.size, fit.size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


# -- Tiny-ImageNet-200 -----------------------------------------------------------------------

def _load_tinyimagenet(path: str, fit: _SizeFit, progress: bool):
    wnids_file = os.path.join(path, "wnids.txt")
    annotations = os.path.join(path, "val", "val_annotations.txt")
    for needed in (wnids_file, annotations):
        if not os.path.isfile(needed):
            raise UserError(f"{path}: missing {os.path.relpath(needed, path)}; expected the Tiny-ImageNet-200 "
                            "layout (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*, val/val_annotations.txt)")
    wnids = [w.strip() for w in open(wnids_file) if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        idir = os.path.join(path, "train", w, "images")
        if not os.path.isdir(idir):
            raise UserError(f"{path}: missing train/{w}/images/ listed in wnids.txt")
        train += [(os.path.join(idir, f), index[w]) for f in sorted(os.listdir(idir))
                  if f.lower().endswith(IMAGE_SUFFIXES)]
    val = []
    for line in open(annotations):
        fields = line.strip().split("\t")
        if len(fields) >= 2:
            if fields[1] not in index:
                raise UserError(f"{annotations}: class {fields[1]} is not in wnids.txt")
            val.append((os.path.join(path, "val", "images", fields[0]), index[fields[1]]))
    splits = []
    for name, items in (("train", train), ("val", val)):
        gen = ((_read_file(p), label, os.path.relpath(p, path)) for p, label in items)
        splits.append(_decode_all(gen, len(items), f"decode {name}", fit, progress))
    gray = splits[0][2] and splits[1][2]
    return _nhwc_split(*splits[0][:2], gray), _nhwc_split(*splits[1][:2], gray), _tiny_names(path, wnids)


def _tiny_names(path: str, wnids: list[str]) -> list[str]:
    """Readable class names from words.txt when present (first synonym), else the wnids."""
    words = os.path.join(path, "words.txt")
    names = {}
    if os.path.isfile(words):
        for line in open(words):
            wnid, _, text = line.rstrip("\n").partition("\t")
            names[wnid] = text.split(",")[0].strip()
    return [names.get(w) or w for w in wnids]


_LOADERS = {
    "cifar10": lambda p, fit, prog: _load_cifar(p, fit, prog, hundred=False),
    "cifar100": lambda p, fit, prog: _load_cifar(p, fit, prog, hundred=True),
    "folder": _load_folder,
    "tinyimagenet": _load_tinyimagenet,
}


# -- cache -----------------------------------------------------------------------------------

def _fingerprint(path: str) -> list:
    """Cheap identity of a file or tree: names, sizes and modification times."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return [h.hexdigest()]


def _cache_key(kind: str, path: str, resize_to: int | None) -> str:
    ident = json.dumps([CACHE_FORMAT, kind, os.path.realpath(path), _fingerprint(path), resize_to])
    return f"{kind}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}"


def _assemble(name: str, train: Split, test: Split, classes: list[str]) -> Dataset:
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"{name}: train images are {tuple(train.images.shape[1:])} but test images are "
                        f"{tuple(test.images.shape[1:])}")
    pixels = train.images.float().div_(255.0)
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return Dataset(name, train, test, classes, mean, std)


def _to_cache(d: Dataset) -> dict:
    return {"format": CACHE_FORMAT, "train_images": d.train.images, "train_labels": d.train.labels,
            "test_images": d.test.images, "test_labels": d.test.labels,
            "classes": d.classes, "mean": d.mean, "std": d.std}


def _from_cache(raw: dict, name: str) -> Dataset:
    if raw.get("format") != CACHE_FORMAT:
        raise ValueError("old cache format")
    return Dataset(name, Split(raw["train_images"], raw["train_labels"]),
                   Split(raw["test_images"], raw["test_labels"]), raw["classes"], raw["mean"], raw["std"])
