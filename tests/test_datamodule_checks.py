"""Pre-checks of the data sources: bad files and settings give one clear error before any long work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.celeba import CelebADataModule, CelebAUsers
from datamodules.folder import FolderUsers, ImageFolderDataModule, unreadable_images
from tests.test_celeba_folder import _noise, make_celeba


# ------------------------------------------------------------------------------------------------ truncated images
def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_or_empty_images_fail_the_pre_checks(tmp_path):
    """An interrupted unzip leaves truncated and empty files whose header still reads: the tail check catches them
    (JPEG without its FF D9 end marker, PNG without IEND), while padded but complete JPEGs pass."""
    good_jpg, good_png = tmp_path / "good.jpg", tmp_path / "good.png"
    _noise(40, 30, seed=1).save(good_jpg, quality=90)
    _noise(40, 30, seed=2).save(good_png)
    padded = tmp_path / "padded.jpg"  # some writers pad after the end marker
    padded.write_bytes(good_jpg.read_bytes() + b"\x00" * 5000 + b" \r\n")
    cut_jpg, cut_png, empty = tmp_path / "cut.jpg", tmp_path / "cut.png", tmp_path / "empty.jpg"
    cut_jpg.write_bytes(good_jpg.read_bytes())
    _truncate(cut_jpg)
    cut_png.write_bytes(good_png.read_bytes())
    _truncate(cut_png)
    empty.write_bytes(b"")
    with Image.open(cut_jpg) as img:  # the header alone does not show the damage
        assert img.size == (40, 30)
    bad = dict(unreadable_images([good_jpg, good_png, padded, cut_jpg, cut_png, empty]))
    assert sorted(bad) == sorted(str(p) for p in (cut_jpg, cut_png, empty))
    assert "FF D9" in bad[str(cut_jpg)] and "IEND" in bad[str(cut_png)]

    # a training folder: one error at setup naming the file, nothing built
    root = tmp_path / "ffhq"
    root.mkdir()
    for k in range(4):
        _noise(40, 40, seed=k).save(root / f"{k}.jpg")
    _truncate(root / "2.jpg")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError, match=rf"1 of 4 image files .*2\.jpg \(truncated.*copy it again"):
        dm.setup("fit")
    assert dm._train is None
    # folder users: check() fails the same way
    (tmp_path / "users" / "amy").mkdir(parents=True)
    _noise(60, 60, seed=1).save(tmp_path / "users" / "amy" / "a.jpg")
    _truncate(tmp_path / "users" / "amy" / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.jpg \(truncated"):
        FolderUsers(str(tmp_path / "users"), batch_size=1).check()


def test_celeba_datamodule_setup_rejects_truncated_images(tmp_path):
    gt = make_celeba(tmp_path)
    images = tmp_path / "celeba" / "img_align_celeba"
    train_files = sorted(f for f, g in gt.items() if g[1] == 0)
    _truncate(images / train_files[0])
    (images / train_files[2]).write_bytes(b"")
    dm = CelebADataModule(tmp_path, target="Male", batch_size=2)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert msg.startswith(f"2 of the {len(gt)} CelebA images used")
    assert str(images / train_files[0]) in msg and "truncated" in msg and str(images / train_files[2]) in msg
    assert "extract img_align_celeba/ again" in msg
    assert dm._train is None
    # the pass can be switched off (the existence check still runs)
    off = CelebADataModule(tmp_path, target="Male", batch_size=2, check_images=False)
    off.setup("fit")
    assert len(off._train) == len(train_files)
    # the users' check() sees truncated files too
    _noise(178, 218, seed=0).save(images / train_files[2], quality=95)
    for f in train_files[1:]:
        _truncate(images / f, keep=0.9)
    spec = CelebAUsers(tmp_path, num_users=2, batch_size=3, split="train", target="Male")
    with pytest.raises(ValueError, match=r"of the 6 CelebA images these users use .*\(truncated: .*FF D9"):
        spec.check()


# ------------------------------------------------------------------------------------------------ CelebA txt files
def _edit_line(path: Path, line_no: int, edit) -> None:
    lines = path.read_text().splitlines(True)
    lines[line_no - 1] = edit(lines[line_no - 1])
    path.write_text("".join(lines))


@pytest.mark.parametrize("name, line_no, edit, match", [
    ("list_eval_partition.txt", 6, lambda s: s.split()[0] + " test\n", "integer partition"),
    ("identity_CelebA.txt", 4, lambda s: s.split()[0] + " 12a\n", "integer identity"),
    ("list_attr_celeba.txt", 5, lambda s: s.replace("-1", "yes", 1) if "-1" in s else s.replace("1", "yes", 1),
     "3 values of -1 or 1"),
])
def test_a_word_in_a_celeba_txt_file_names_the_file_and_the_line(tmp_path, name, line_no, edit, match):
    """pandas 3 reads a column holding a word as its string dtype, which np.issubdtype rejected with a TypeError
    ('Cannot interpret StringDtype as a data type'): now one ValueError naming the file and the first bad line."""
    make_celeba(tmp_path)
    path = tmp_path / "celeba" / name
    _edit_line(path, line_no, edit)
    bad_text = path.read_text().splitlines()[line_no - 1]
    with pytest.raises(ValueError) as err:
        CelebAUsers(tmp_path, num_users=1, batch_size=1, split="train").check()
    msg = str(err.value)
    assert msg.startswith(str(path)) and match in msg and f"line {line_no}: {bad_text[:100]!r}" in msg


def test_attribute_file_without_its_count_line(tmp_path):
    make_celeba(tmp_path)
    path = tmp_path / "celeba" / "list_attr_celeba.txt"
    path.write_text("".join(path.read_text().splitlines(True)[1:]))  # line 1 (the image count) dropped
    with pytest.raises(ValueError, match=r"list_attr_celeba\.txt: line 1 must be the image count, line 2 the 40 "
                                         r"attribute names .*found line 1 '5_o_Clock_Shadow Male Smiling'"):
        CelebAUsers(tmp_path, num_users=1, batch_size=1, split="train").check()


@pytest.mark.parametrize("name, first", [("identity_CelebA.txt", 1), ("list_eval_partition.txt", 1),
                                          ("list_attr_celeba.txt", 3)])
def test_a_file_listed_twice_in_a_celeba_txt_file_is_refused(tmp_path, name, first):
    """A repeated line in identity_CelebA.txt put the same image twice into one user's batch, silently."""
    gt = make_celeba(tmp_path)
    path = tmp_path / "celeba" / name
    lines = path.read_text().splitlines(True)
    lines.insert(first + 6, lines[first])  # the image of data line 2 listed again further down
    path.write_text("".join(lines))
    repeated = sorted(gt)[1]
    with pytest.raises(ValueError, match=rf"{name}: {repeated} is listed 2 times \(lines {first + 1}, {first + 7}\); "
                                         "every image must be listed once"):
        CelebAUsers(tmp_path, num_users=2, batch_size=2, split="train", target="Male").check()


# ------------------------------------------------------------------------------------------------ CelebA users
@pytest.mark.parametrize("split", ["test", "valid", "all"])
def test_identity_labels_only_from_the_train_split(tmp_path, split):
    """With target 'identity' the labels index the sorted identities of the users' split, but an identity victim's
    classes are the train identities (CelebADataModule): any other split gives gradients for unrelated identities."""
    make_celeba(tmp_path)
    spec = CelebAUsers(tmp_path, num_users=1, batch_size=2, split=split, target="identity")
    with pytest.raises(ValueError, match=rf"target='identity' with split '{split}'.*unrelated identity.*"
                                         r"target: Male.*split: holdout .* or train"):
        spec.check()
    with pytest.raises(ValueError, match="unrelated identity"):
        spec.users()
    # split 'train' is the victim's mapping: class k <-> the k-th sorted train identity, as CelebADataModule's
    with pytest.warns(UserWarning, match="seen by both models"):  # the victim and the prior trained on them
        users = CelebAUsers(tmp_path, num_users=2, batch_size=2, split="train", target="identity").users()
    dm = CelebADataModule(tmp_path, target="identity")
    for u in users:
        assert u.labels.tolist() == [int(np.searchsorted(dm.classes, u.meta["identity"]))] * 2
    CelebAUsers(tmp_path, num_users=1, batch_size=2, split=split, target="Male").check()  # attributes: any split


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_a_damaged_fashion_mnist_file_fails_the_users_check(tmp_path, monkeypatch, damage):
    """A truncated or corrupt .gz gave a bare EOFError/zlib traceback when the users were built (after the models
    loaded): now FashionMNISTUsers.check() reads the test split and raises one ValueError naming file and fix."""
    from datamodules.fashion_mnist import load_split
    from datamodules.users import FashionMNISTUsers
    from tests.helpers import write_fake_fmnist

    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(tmp_path / "nowhere"))
    root = write_fake_fmnist(tmp_path)
    path = root / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    if damage == "truncated":  # an interrupted download
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":  # flipped bytes inside the compressed stream
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :])
    else:
        path.write_bytes(b"")
    source = FashionMNISTUsers(num_users=2, batch_size=5, root=str(root))
    with pytest.raises(ValueError, match=rf"{path}: .*(truncated|corrupt).*apt-get install --reinstall "
                                         "dataset-fashion-mnist.*download Fashion-MNIST again"):
        source.check()
    with pytest.raises(ValueError, match=rf"{path}: .*(truncated|corrupt)"):
        load_split("test", str(root), download=False)


def test_a_batch_the_classes_cannot_serve_fails_the_users_check_with_the_advice_of_its_mode(tmp_path, monkeypatch):
    """The class-too-small error came only from users() (after the models loaded) and always said to lower
    dominant_fraction, which a Dirichlet mix ignores: check() now runs the users' draw on the split's labels."""
    from datamodules.users import FashionMNISTUsers
    from tests.helpers import write_fake_fmnist

    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(tmp_path / "nowhere"))
    root = str(write_fake_fmnist(tmp_path))  # test split: 100 images, 10 per class
    mixed = FashionMNISTUsers(num_users=3, batch_size=30, dirichlet_alpha=0.1, root=root)
    with pytest.raises(ValueError) as err:
        mixed.check()
    msg = str(err.value)
    assert "but the split has only 10" in msg and "Dirichlet(alpha=0.1)" in msg
    assert "lower users.batch_size (at most 10" in msg and "users.dirichlet_alpha" in msg
    assert "dominant_fraction" not in msg
    dominant = FashionMNISTUsers(num_users=1, batch_size=12, dominant_fraction=1.0, root=root)
    with pytest.raises(ValueError, match=r"needs 12 images of class \d but the split has only 10: the dominant class "
                                         r"takes .* lower users.batch_size or users.dominant_fraction"):
        dominant.check()
    # check() and users() draw the same: what check() passes, users() builds
    ok = FashionMNISTUsers(num_users=3, batch_size=8, dirichlet_alpha=100.0, root=root, image_size=8)
    ok.check()
    assert [u.batch_size for u in ok.users()] == [8, 8, 8]


# ------------------------------------------------------------------------------------------------ split sizes
def test_fashion_mnist_val_size_is_checked(tmp_path):
    """A negative val_size silently swapped the split (perm[:-k] for validation) and one too large left no training
    batch, so train.py exited 0 exporting an untrained model: both are errors now."""
    from datamodules.fashion_mnist import FashionMNISTDataModule
    from tests.helpers import write_fake_fmnist

    root = str(write_fake_fmnist(tmp_path))  # 200 training images
    with pytest.raises(ValueError, match=r"val_size must be an integer >= 0, got -40"):
        FashionMNISTDataModule(root=root, batch_size=16, val_size=-40)
    for val_size, batch_size in ((200, 16), (190, 16), (500, 1)):
        dm = FashionMNISTDataModule(root=root, batch_size=batch_size, val_size=val_size)
        with pytest.raises(ValueError, match=rf"Fashion-MNIST train split holds 200 images, {200 - val_size} for "
                                             rf"training .* fewer than data.init_args.batch_size={batch_size} .*"
                                             "lower data.init_args.val_size or batch_size"):
            dm.setup("fit")
        assert dm._train is None
    dm = FashionMNISTDataModule(root=root, batch_size=16, val_size=184)  # exactly one batch left
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 1 and len(dm._val) == 184
    dm = FashionMNISTDataModule(root=root, batch_size=16, val_size=0)
    dm.setup("fit")
    assert len(dm._train) == 200 and len(dm._val) == 0


def test_celeba_and_folder_modules_share_the_train_size_check(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(5):
        _noise(20, 20, seed=k).save(root / f"{k}.png")
    with pytest.raises(ValueError, match=rf"{root} holds 5 images, 3 for training after holding out 2 for validation: "
                                         r"fewer than data.init_args.batch_size=4 .*Fix: lower batch_size or "
                                         "val_fraction"):
        ImageFolderDataModule(str(root), batch_size=4, val_fraction=0.4).setup()
    make_celeba(tmp_path)  # 8 train-partition images, 11 valid/test
    with pytest.raises(ValueError, match=r"CelebA \(target 'Male'\) holds 19 images, 8 for training after holding "
                                         r"out 11 for validation and test: fewer than data.init_args.batch_size=9"):
        CelebADataModule(tmp_path, target="Male", batch_size=9).setup()
    with pytest.raises(ValueError, match=r"CelebA \(target 'identity'\) holds 8 images, 6 for training .*"
                                         "batch_size=7 .*lower batch_size or identity_holdout"):
        CelebADataModule(tmp_path, target="identity", batch_size=7, identity_holdout=0.25).setup()


def test_a_mistyped_fashion_mnist_root_is_not_downloaded_into(tmp_path, monkeypatch):
    """An explicit root lacking the files got a download attempt into it (creating root/FashionMNIST/raw in a
    mistyped folder); now it is the missing-files error at once. Without a root the download is still tried."""
    import torchvision.datasets

    from datamodules.fashion_mnist import DataNotFoundError, FashionMNISTDataModule, find_fashion_mnist_root

    calls = []

    class FakeDownload:  # stands in for torchvision's FashionMNIST: records the call, creates what it would
        def __init__(self, root, train=True, download=False):
            calls.append(root)
            (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("offline")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    typo = tmp_path / "fashon-mnist"
    with pytest.raises(DataNotFoundError, match=rf"looked in {typo}, .*an explicit root is not downloaded into.*"
                                                "apt-get install dataset-fashion-mnist"):
        find_fashion_mnist_root(str(typo))
    with pytest.raises(DataNotFoundError, match="fashon-mnist"):
        FashionMNISTDataModule(root=str(typo)).prepare_data()
    assert calls == [] and not typo.exists()
    with pytest.raises(DataNotFoundError, match="download failed: offline"):  # no root: the download is tried
        find_fashion_mnist_root(None)
    assert calls == [str(tmp_path / "home" / ".cache" / "fashion-mnist")]


def test_images_with_data_appended_after_their_end_pass_the_pre_checks(tmp_path):
    """A valid JPEG or PNG followed by other bytes (motion photos append a video, some tools metadata) failed the
    end check as 'truncated' and stopped the whole run; a file cut short still fails."""
    import os

    import numpy as np
    from PIL import Image

    from datamodules.folder import unreadable_images

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for ext in ("jpg", "png"):
        data = (tmp_path / f"a.{ext}").read_bytes()
        (tmp_path / f"appended.{ext}").write_bytes(data + os.urandom(9000))
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    names = ["appended.jpg", "appended.png", "cut.jpg", "cut.png"]
    bad = unreadable_images([tmp_path / n for n in names])
    assert [os.path.basename(p) for p, _ in bad] == ["cut.jpg", "cut.png"]
