"""The client's inputs: image files and .npy arrays checked against the plan before anything is shared."""

from __future__ import annotations

import os
import warnings

from secure.control import protocol

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MAX_IMAGE_PIXELS = 40_000_000


def load_inputs(paths: list[str], input_shape, mean: list[float], std: list[float], resize: bool,
                convert: bool = False):
    """-> (normalised float32 N x C x H x W tensor, one name per image) for a plan that takes
    `input_shape` inputs normalised with `mean`/`std`. Image files are decoded like `deepreduce predict`;
    .npy files hold already-normalised pixels. Every problem is one ControlError."""
    import torch

    from deepreduce.data import load_image_files, normalize  # imports torch
    c, h, w = (int(d) for d in input_shape)
    if h != w:
        raise protocol.ControlError(f"the server's plan expects {h}x{w} images; only square inputs are supported")
    limit = _normalised_bound(mean, std)
    parts, names = [], []
    images: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            raise protocol.ControlError(f"input {path} is a directory, not an image or .npy file")
        if not os.path.isfile(path):
            raise protocol.ControlError(f"input {path} does not exist")
        if path.lower().endswith(".npy"):
            if images:
                parts.append(images)
                images = []
            arr, single = load_npy(path, (c, h, w), limit)
            parts.append(arr)
            names += [path] if single else [f"{path}[{i}]" for i in range(len(arr))]
        else:
            check_image(path, c, convert)
            images.append(path)
            names.append(path)
    if images:
        parts.append(images)
    batches = []
    for part in parts:
        if isinstance(part, list):
            batches.append(normalize(load_image_files(part, c, h, resize=resize), mean, std))
        else:
            batches.append(torch.from_numpy(part))
    return torch.cat(batches).float(), names


def check_image(path: str, channels: int, convert: bool) -> None:
    """Readable, not absurdly large, and with the channel count the model expects (unless --convert)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise protocol.ControlError(f"{path} is not a readable image ({protocol.one_line(str(exc), 200)})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise protocol.ControlError(f"image {path} is {width}x{height}, larger than the {MAX_IMAGE_PIXELS:,}-pixel limit")
    has = 1 if mode in GRAY_MODES else 3
    if has != channels and not convert:
        kind = {1: "grayscale (1 channel)", 3: f"color ({mode}, 3 channels)"}
        raise protocol.ControlError(f"image {path} is {kind[has]} but the model expects "
                                    f"{'1 channel' if channels == 1 else '3 channels (RGB)'}: pass --convert to convert it")


def load_npy(path: str, shape: tuple[int, int, int], limit: float):
    """-> (float32 N x C x H x W array, whether the file held a single C x H x W image)."""
    import numpy as np
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise protocol.ControlError(f"{path} is not a readable .npy array ({protocol.one_line(str(exc), 200)})") from None
    if not isinstance(arr, np.ndarray):
        raise protocol.ControlError(f"{path} is an .npz archive, not one .npy array: save one array with numpy.save")
    want = " x ".join(map(str, shape))
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise protocol.ControlError(f"{path} holds {arr.dtype} values; a .npy input holds float32 (or float16/64) "
                                    f"normalised pixels, N x {want}")
    single = arr.ndim == 3
    if single:
        arr = arr[None]
    if arr.ndim != 4:
        raise protocol.ControlError(f"{path} holds an array of shape {tuple(arr.shape)}; the model expects "
                                    f"N x {want} (or {want})")
    if arr.shape[0] == 0:
        raise protocol.ControlError(f"{path} holds no images (shape {tuple(arr.shape)}): an empty batch")
    if tuple(arr.shape[1:]) != shape:
        what = (f"{arr.shape[1]} channels, the model expects {shape[0]}" if arr.shape[1] != shape[0]
                else f"{arr.shape[2]}x{arr.shape[3]} images, the model expects {shape[1]}x{shape[2]}")
        raise protocol.ControlError(f"{path} holds {what} (array shape {tuple(arr.shape)}, expected N x {want}); "
                                    ".npy inputs are not resized")
    data = np.array(arr, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argwhere(bad)[0][0])
        raise protocol.ControlError(f"{path} holds {int(bad.sum())} NaN or infinite value(s) (first in image {first}): "
                                    "inputs must be finite")
    peak = float(np.abs(data).max())
    if peak > limit:
        raise protocol.ControlError(f"{path} holds values up to {peak:g}, beyond the {limit:g} that normalised pixels "
                                    "of this model reach: apply the plan's mean/std to pixels in [0, 1] "
                                    "(`pi-client info --json` shows them)")
    return data, single


def _normalised_bound(mean: list[float], std: list[float]) -> float:
    """Twice the largest |(p - mean) / std| over pixels p in [0, 1]: far outside it is not a normalised image."""
    worst = max(max(m, 1 - m) / s for m, s in zip(mean, std) if s > 0)
    return max(8.0, 2 * worst)
