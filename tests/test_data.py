"""Embedded data sets, users' own images, quantisation."""
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from flowkern import data


def test_digits():
    levels, labels = data.load_digits()
    assert levels.shape == (1797, 1, 8, 8) and levels.dtype == torch.uint8
    assert levels.min() == 0 and levels.max() == 16
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("name", data.TOY_SETS)
def test_toy_sets(name):
    x = data.toy2d(name, 500, seed=3)
    assert x.shape == (500, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, data.toy2d(name, 500, seed=3))
    assert not torch.equal(x, data.toy2d(name, 500, seed=4))
    assert 0.3 < x.std(dim=0).min() and x.abs().max() < 6


def test_checkerboard_toy_set_fills_alternate_squares():
    x = data.toy2d("checkerboard", 4000)
    cells = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])) % 2
    assert torch.all(cells == 0)


def test_unknown_toy_set():
    with pytest.raises(ValueError, match="expected one of: moons"):
        data.toy2d("spirals", 10)


def test_quantize_and_dequantize():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    five_bit = data.quantize(images, 5)
    assert five_bit.max() <= 31 and torch.equal(five_bit, images // 8)
    x = data.dequantize(five_bit, 32)
    assert x.min() >= -0.5 and x.max() < 0.5
    assert torch.equal(torch.floor((x + 0.5) * 32).to(torch.uint8), five_bit)
    centre = data.dequantize(five_bit, 32, noise=False)
    torch.testing.assert_close(centre, (five_bit.float() + 0.5) / 32 - 0.5)
    with pytest.raises(ValueError, match="n_bits must be in 1..8"):
        data.quantize(images, 9)


def test_npz_loader(tmp_path):
    hwc = np.random.randint(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=hwc, labels=np.arange(5))
    loaded = data.load_npz(tmp_path / "rgb.npz")
    assert loaded.shape == (5, 3, 6, 7) and torch.equal(loaded, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    np.savez(tmp_path / "grey.npz", np.random.randint(0, 17, (4, 8, 8)))
    assert data.load_npz(tmp_path / "grey.npz").shape == (4, 1, 8, 8)
    np.savez(tmp_path / "two.npz", a=hwc, b=hwc)
    with pytest.raises(ValueError, match="pass key="):
        data.load_npz(tmp_path / "two.npz")
    np.savez(tmp_path / "float.npz", x=np.random.rand(3, 4, 4))
    with pytest.raises(ValueError, match="integer images"):
        data.load_npz(tmp_path / "float.npz")


def test_image_folder_loader(tmp_path):
    from PIL import Image

    arrays = [np.random.randint(0, 256, (6, 4, 3), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = data.load_image_folder(tmp_path)
    assert loaded.shape == (3, 3, 6, 4)
    assert torch.equal(loaded[1], torch.from_numpy(arrays[1]).permute(2, 0, 1))
    assert data.load_image_folder(tmp_path, size=8, grey=True).shape == (3, 1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.load_image_folder(tmp_path / "empty")


def test_cifar10_loader_reads_the_python_version(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = {}
    for name in data.CIFAR10_TRAIN + data.CIFAR10_TEST:
        hwc = np.random.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        images[name] = hwc
        rows = hwc.transpose(0, 3, 1, 2).reshape(3, 3072)  # the set's layout: red plane, green, blue
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0, 1, 2]}, f)
    assert data.find_cifar10(str(tmp_path)) == str(folder)
    train, test = data.load_cifar10(str(tmp_path))
    assert train.shape == (15, 3, 32, 32) and test.shape == (3, 3, 32, 32) and train.dtype == torch.uint8
    assert torch.equal(train[3:6], torch.from_numpy(images["data_batch_2"]).permute(0, 3, 1, 2))
    assert torch.equal(test, torch.from_numpy(images["test_batch"]).permute(0, 3, 1, 2))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data.load_cifar10(str(tmp_path / "cifar-10-batches-py" / "missing"))


def test_split_is_fixed_and_disjoint():
    rows = torch.arange(100)
    train, test = data.split(rows, 0.1)
    assert len(test) == 10 and len(train) == 90
    assert sorted(torch.cat([train, test]).tolist()) == list(range(100))
    assert torch.equal(test, data.split(rows, 0.1)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        data.split(rows, 1.5)


class _RunsCode:
    """What a hostile CIFAR-10 batch holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _cifar_folder(root, hostile=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in data.CIFAR10_TRAIN + data.CIFAR10_TEST:
        batch = {b"batch_label": b"training batch", b"labels": [0, 1], b"filenames": [b"a.png", b"b.png"],
                 b"data": np.random.randint(0, 256, (2, 3072), dtype=np.uint8)}
        if name == hostile:
            batch[b"labels"] = _RunsCode(root / "ran")
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_a_cifar10_batch_that_names_code_is_refused_not_run(tmp_path, capsys):
    import flowkern.train as train

    assert data.load_cifar10(str(_cifar_folder(tmp_path / "good")))[0].shape == (10, 3, 32, 32)
    folder = _cifar_folder(tmp_path / "bad", hostile="data_batch_3")
    with pytest.raises(ValueError, match=r"data_batch_3: not a batch .* names posix.system, which a CIFAR-10 "
                                         r"batch never holds; refused"):
        data.load_cifar10(str(folder))
    assert train.main(["--data", "cifar10", "--data-dir", str(folder.parent), "--out", str(tmp_path / "run"),
                       "--no-progress"]) == 2
    assert "data_batch_3" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "ran").exists() and not (tmp_path / "run").exists()
    with open(folder / "test_batch", "wb") as f:  # an array of objects is not a batch either
        pickle.dump({b"data": np.array([[_RunsCode(tmp_path / "bad" / "ran")]] * 2, dtype=object)}, f, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        data.load_cifar10(str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "ran").exists()


def test_an_image_whose_header_claims_a_huge_size_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "bomb.png")
    png = bytearray((folder / "bomb.png").read_bytes())
    png[16:24] = struct.pack(">II", 30000, 30000)  # IHDR's width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (folder / "bomb.png").write_bytes(bytes(png))
    with pytest.raises(ValueError, match="bomb.png: not a readable image"):
        data.load_image_folder(folder)


def test_greyscale_folders_stay_greyscale_and_mixed_ones_get_three_channels(tmp_path):
    from PIL import Image

    grey = np.random.randint(0, 256, (6, 6), np.uint8)
    Image.fromarray(grey).save(tmp_path / "a.png")
    loaded = data.load_image_folder(tmp_path)
    assert loaded.shape == (1, 1, 6, 6) and torch.equal(loaded[0, 0], torch.from_numpy(grey))
    Image.fromarray(np.random.randint(0, 256, (6, 6, 3), np.uint8)).save(tmp_path / "b.png")
    mixed = data.load_image_folder(tmp_path)
    assert mixed.shape == (2, 3, 6, 6) and all(torch.equal(mixed[0, c], torch.from_numpy(grey)) for c in range(3))
    assert data.load_image_folder(tmp_path, grey=True).shape == (2, 1, 6, 6)
    assert data.load_image_folder(tmp_path, grey=False).shape == (2, 3, 6, 6)


def test_a_file_named_npz_that_is_not_one(tmp_path):
    (tmp_path / "notes.npz").write_text("a text file")
    with pytest.raises(ValueError) as error:
        data.load_npz(tmp_path / "notes.npz")
    assert "not a readable .npz archive" in str(error.value) and "pickle" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_npz(tmp_path / "missing.npz")
