"""Data that ships with the package's dependencies (no downloads), users' own images, and quantisation.

Images are handled as integer levels (N, C, H, W) plus their number of levels ``n_bins``;
:func:`dequantize` turns them into the continuous inputs the models take, on [-0.5, 0.5).
"""
import codecs
import math
import os
import pickle
import zipfile

import numpy as np
import torch

TOY_SETS = ("moons", "circles", "8gaussians", "checkerboard")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RUN_FILES = ("checkpoint.pt", "log.jsonl")  # what marks a run folder of flowkern.train


def load_digits():
    """scikit-learn's handwritten digits: 1797 grey 8×8 images with 17 levels (0..16).

    Returns ``(levels, labels)``: uint8 (1797, 1, 8, 8) and int64 (1797,). Their ``n_bins`` is 17.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    levels = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
    return levels, torch.from_numpy(digits.target.astype(np.int64))


def toy2d(name: str, n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """``n`` points (n, 2) float32 of a 2-D toy density: moons, circles, 8gaussians or checkerboard."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x = make_moons(n, noise=noise, random_state=seed)[0]
        x = (x - [0.5, 0.25]) * 2.0
    elif name == "circles":
        from sklearn.datasets import make_circles

        x = make_circles(n, noise=noise, factor=0.5, random_state=seed)[0] * 3.0
    elif name == "8gaussians":
        angles = rng.integers(0, 8, n) * (2 * math.pi / 8)
        centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 2.0
        x = centres + rng.normal(scale=0.3, size=(n, 2))
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2.0 + np.floor(x1) % 2
        x = np.stack([x1, x2], axis=1) * 1.0
    else:
        raise ValueError(f"unknown toy set {name!r}; expected one of: {', '.join(TOY_SETS)}")
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def load_npz(path, key=None) -> torch.Tensor:
    """Integer images from a ``.npz``: (N, H, W), (N, H, W, C) or (N, C, H, W) → uint8 (N, C, H, W).

    ``key`` names the array; by default the file's only array, or ``"x"``/``"images"`` if present.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz archive (not a zip of .npy arrays, as numpy.savez writes)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz archive of images ({error})") from None
    with archive:
        names = list(archive.keys())
        if key is None:
            key = next((k for k in ("x", "images") if k in names), names[0] if len(names) == 1 else None)
            if key is None:
                raise ValueError(f"{path} holds the arrays {names}: name the images x or images (or pass key= "
                                 "to load_npz)")
        elif key not in names:
            raise ValueError(f"{path} has no array {key!r}; it holds {names}")
        try:
            array = archive[key]
        except (OSError, ValueError, EOFError) as error:
            raise ValueError(f"{path}: its array {key!r} cannot be read ({error})") from None
    return _to_nchw(array, str(path))


def holds_run(folder) -> bool:
    """Whether ``folder`` is a run folder of ``flowkern.train`` (it holds a checkpoint or a log)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in RUN_FILES)


def image_files(path):
    """The image files under the folder ``path``, subfolders included (one per class, say), in sorted order.
    Run folders of ``flowkern.train`` (:func:`holds_run`) are skipped: their sample grids are not data."""
    found = []
    for folder, subfolders, files in os.walk(path):
        if holds_run(folder):
            subfolders.clear()
            continue
        subfolders.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes with one colour band


def load_image_folder(path, size=None, grey=None) -> torch.Tensor:
    """Every image file under a folder and its subfolders (in sorted order, run folders skipped) as uint8
    (N, C, H, W), resized to ``size`` (an int or (width, height)) if given. C is 1 when every image is
    greyscale (or ``grey=True``: converted), else 3 (``grey=False``: greyscale images are given 3 channels)."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(path)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path} or its subfolders")
    images, all_grey = [], True
    for file in files:
        try:
            with Image.open(file) as image:
                one_band = image.mode in GREY_MODES
                all_grey &= one_band
                image = image.convert("L" if grey or (grey is None and one_band) else "RGB")
                if size is not None:
                    image = image.resize((size, size) if isinstance(size, int) else size, Image.BILINEAR)
                images.append(np.asarray(image))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{file}: not a readable image ({error})") from None
    if grey is None and not all_grey:  # a mixed folder: its greyscale images in three channels
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} differ in size {sorted(shapes)}: choose one size to resize them to "
                         "(size=, or --image-size on the command line)")
    return _to_nchw(np.stack(images), path)


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


def find_cifar10(path):
    """The ``cifar-10-batches-py`` folder at or directly under ``path``, or None."""
    for folder in (path, os.path.join(path, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(folder, name)) for name in CIFAR10_TRAIN + CIFAR10_TEST):
            return folder
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Reads only what a batch of the python version of CIFAR-10 holds: dicts, lists, bytes, str, numbers and
    numpy arrays of numbers. Any other class or function named in the file is refused, so a crafted batch
    cannot run code."""

    _reconstruct = np.ndarray((0,)).__reduce__()[0]  # numpy's array rebuilder, under its 1.x and 2.x paths
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
               ("_codecs", "encode"): codecs.encode}  # protocol 2 writes bytes as _codecs.encode(str, "latin1")

    def find_class(self, module, name):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds; "
                                         "refused: unpickling it could run code") from None


def _read_cifar_batch(file):
    """The rows (N, 3072) uint8 of one CIFAR-10 batch file, read by :class:`_CifarUnpickler`."""
    try:
        with open(file, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError(f"a dict expected, got {type(batch).__name__}")
        rows = batch[b"data"] if b"data" in batch else batch["data"]
        if not isinstance(rows, np.ndarray) or rows.dtype.kind not in "iu":
            raise ValueError(f"data must be an integer numpy array, got {getattr(rows, 'dtype', type(rows))}")
        if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
            raise ValueError(f"rows of 3072 values expected, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() > 255):
            raise ValueError(f"levels 0..255 expected, got values from {rows.min()} to {rows.max()}")
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError,
            OverflowError, MemoryError) as error:
        raise ValueError(f"{file}: not a batch of the python version of CIFAR-10, or truncated "
                         f"({type(error).__name__}: {error})") from None
    return rows.astype(np.uint8).reshape(-1, 3, 32, 32)


def load_cifar10(path):
    """CIFAR-10 from the python version of the data set already on disk (``cifar-10-batches-py``, at
    ``path`` or under it; flowkern never downloads). Returns ``(train, test)``: uint8 (50000, 3, 32, 32)
    and (10000, 3, 32, 32).

    The batches are pickles, read by an unpickler that admits only what a CIFAR-10 batch holds: a file
    that names any other class or function is refused (ValueError naming the file), never run."""
    folder = find_cifar10(path)
    if folder is None:
        raise FileNotFoundError(f"no CIFAR-10 under {path}: expected the folder cifar-10-batches-py (its files "
                                f"{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}) from the python version of the set")

    def read(names):
        return torch.from_numpy(np.concatenate([_read_cifar_batch(os.path.join(folder, n)) for n in names]))

    return read(CIFAR10_TRAIN), read(CIFAR10_TEST)


def split(data: torch.Tensor, test_fraction: float = 0.1, seed: int = 0):
    """``(train, test)``: a fixed random ``test_fraction`` of the rows of ``data`` held out."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(data) < 2:
        raise ValueError(f"need at least 2 rows to hold some out for testing, got {len(data)}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(data) * test_fraction))
    return data[order[n_test:]], data[order[:n_test]]


def _to_nchw(array, source):
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{source}: expected integer images (levels 0..255), got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{source}: holds no images (shape {array.shape})")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"{source}: expected levels 0..255, got values from {array.min()} to {array.max()}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise ValueError(f"{source}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                         f"got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))


def quantize(images: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    """Reduce 8-bit levels (0..255) to ``n_bits`` (0..2**n_bits − 1), as Glow does for 5-bit CelebA."""
    if not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be in 1..8, got {n_bits}")
    return torch.div(images.to(torch.int64), 2 ** (8 - n_bits), rounding_mode="floor").to(torch.uint8)


def dequantize(levels: torch.Tensor, n_bins: int, generator=None, noise: bool = True) -> torch.Tensor:
    """Integer levels in 0..n_bins−1 → float32 ``(levels + u) / n_bins − 0.5`` with ``u ~ U[0, 1)``.

    ``noise=False`` puts every value at the centre of its bin (u = 0.5), for deterministic evaluation.
    """
    x = levels.to(torch.float32)
    if noise:
        u = torch.rand(x.shape, generator=generator, device=x.device)
    else:
        u = torch.full_like(x, 0.5)
    return (x + u) / n_bins - 0.5
