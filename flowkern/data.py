"""Data that ships with the package's dependencies (no downloads), users' own images, and quantisation.

Images are handled as integer levels (N, C, H, W) plus their number of levels ``n_bins``;
:func:`dequantize` turns them into the continuous inputs the models take, on [-0.5, 0.5).
"""
import math
import os

import numpy as np
import torch

TOY_SETS = ("moons", "circles", "8gaussians", "checkerboard")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz archive of images ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not a .npz archive of images")
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


def image_files(path):
    """The image files under the folder ``path``, subfolders included (one per class, say), in sorted order."""
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return found


def load_image_folder(path, size=None, grey=False) -> torch.Tensor:
    """Every image file under a folder and its subfolders (in sorted order) as uint8 (N, C, H, W), resized
    to ``size`` (an int or (width, height)) if given."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(path)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path} or its subfolders")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if grey else "RGB")
                if size is not None:
                    image = image.resize((size, size) if isinstance(size, int) else size, Image.BILINEAR)
                images.append(np.asarray(image))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"{file}: not a readable image ({error})") from None
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


def load_cifar10(path):
    """CIFAR-10 from the python version of the data set already on disk (``cifar-10-batches-py``, at
    ``path`` or under it; flowkern never downloads). Returns ``(train, test)``: uint8 (50000, 3, 32, 32)
    and (10000, 3, 32, 32)."""
    import pickle

    folder = find_cifar10(path)
    if folder is None:
        raise FileNotFoundError(f"no CIFAR-10 under {path}: expected the folder cifar-10-batches-py (its files "
                                f"{', '.join(CIFAR10_TRAIN + CIFAR10_TEST)}) from the python version of the set")

    def read(names):
        parts = []
        for name in names:
            file = os.path.join(folder, name)
            try:
                with open(file, "rb") as f:
                    rows = np.asarray(pickle.load(f, encoding="bytes")[b"data"], dtype=np.uint8)
                if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
                    raise ValueError(f"rows of 3072 values expected, got shape {rows.shape}")
                parts.append(rows.reshape(-1, 3, 32, 32))
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as error:
                raise ValueError(f"{file}: not a batch of the python version of CIFAR-10, or truncated "
                                 f"({type(error).__name__}: {error})") from None
        return torch.from_numpy(np.concatenate(parts))

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
