"""Data modules after review: Fashion-MNIST at its native 28x28, '~' in every data root, FolderUsers' cheap checks
before the file reads, and CelebA identity users (which photos the victim and the prior saw; split 'holdout')."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datamodules.celeba import CelebADataModule, CelebAUsers, load_celeba_index
from datamodules.fashion_mnist import FashionMNISTDataModule, find_fashion_mnist_root, read_idx, to_tensor_images
from datamodules.folder import FolderUsers, ImageFolderDataModule, find_images
from datamodules.users import FashionMNISTUsers
from tests.helpers import write_fake_fmnist
from tests.test_celeba_folder import _noise, make_celeba


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
def test_fashion_mnist_28_is_the_native_image_and_other_sizes_are_unchanged(tmp_path):
    """image_size 28 padded the image to 32 and resampled it back to 28 (the garment shrank and blurred)."""
    root = write_fake_fmnist(tmp_path)
    imgs = read_idx(root / "t10k-images-idx3-ubyte")[:4]
    native = torch.from_numpy(imgs.astype(np.float32) / 255.0).unsqueeze(1)
    x = to_tensor_images(imgs, 28, 1)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, native)
    assert torch.equal(to_tensor_images(imgs, 28, 3), native.repeat(1, 3, 1, 1))
    # 32 (the default, measured results depend on it): zero padding, exactly as before
    assert torch.equal(to_tensor_images(imgs, 32, 1), F.pad(native, (2, 2, 2, 2)))
    # other sizes as before: above 28 pad then bilinear, below 28 antialiased bilinear from 28
    ref40 = F.interpolate(F.pad(native, (2, 2, 2, 2)), size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(to_tensor_images(imgs, 40, 1), ref40.clamp(0, 1), rtol=0, atol=0)
    ref16 = F.interpolate(native, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(to_tensor_images(imgs, 16, 1), ref16.clamp(0, 1), rtol=0, atol=0)
    # the data module and the users get the native pixels too
    dm = FashionMNISTDataModule(root=str(root), image_size=28, batch_size=4, val_size=0)
    dm.setup("test")
    assert torch.equal(dm._test.tensors[0][:4], native)
    user = FashionMNISTUsers(num_users=1, batch_size=2, root=str(root), image_size=28).users()[0]
    all_test = torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte").astype(np.float32) / 255.0)
    for img in user.images[:, 0]:
        assert any(torch.equal(img, t) for t in all_test)


# ------------------------------------------------------------------------------------------------ '~' in roots
def test_data_roots_expand_home(tmp_path, monkeypatch):
    """Only CelebA roots expanded '~'; Fashion-MNIST, FolderUsers and ImageFolderDataModule took it literally."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "fm").mkdir()
    fm = write_fake_fmnist(tmp_path / "fm")
    assert find_fashion_mnist_root("~/fm", download=False) == fm
    assert read_idx("~/fm/t10k-labels-idx1-ubyte").shape == (100,)
    dm = FashionMNISTDataModule(root="~/fm", batch_size=4, val_size=10)
    dm.setup("fit")
    assert len(dm._train) == 190
    for who in ("a", "b"):
        (tmp_path / "lfw" / who).mkdir(parents=True)
        _noise(12, 12, seed=ord(who)).save(tmp_path / "lfw" / who / f"{who}.png")
    spec = FolderUsers("~/lfw", batch_size=1, image_size=8)
    assert [name for name, _ in spec.user_folders()] == ["a", "b"]
    users = spec.users()
    assert [u.user_id for u in users] == ["a", "b"] and users[0].images.shape == (1, 3, 8, 8)
    assert find_images("~/lfw") == [tmp_path / "lfw" / "a" / "a.png", tmp_path / "lfw" / "b" / "b.png"]
    idm = ImageFolderDataModule(root="~/lfw", image_size=8, batch_size=1, val_fraction=0.0)
    idm.setup()
    assert len(idm._train) == 2


# ------------------------------------------------------------------------------------------------ FolderUsers.check
def test_folder_users_batch_check_comes_before_reading_the_images(tmp_path, monkeypatch):
    """check() read every selected image's header and end before the instant 'fewer than B images' check: with a
    folder short of B images and a damaged file the slow read ran and its error came instead."""
    root = tmp_path / "users"
    (root / "ann").mkdir(parents=True)
    _noise(10, 10, seed=1).save(root / "ann" / "ok.png")
    (root / "ann" / "broken.jpg").write_bytes(b"not a jpeg")
    reads = []
    import datamodules.folder as folder

    real = folder.unreadable_images
    monkeypatch.setattr(folder, "unreadable_images", lambda paths: reads.append(list(paths)) or real(paths))
    with pytest.raises(ValueError, match=r"batch_size=3 but 1 user folder\(s\) .* ann \(2\)"):
        FolderUsers(str(root), batch_size=3).check()
    assert reads == []  # no file read before the B error
    with pytest.raises(ValueError, match=r"1 of the 2 images .*broken\.jpg"):  # B fits: the read runs and fails
        FolderUsers(str(root), batch_size=2).check()
    assert len(reads) == 1


# ------------------------------------------------------------------------------------------------ CelebA identity
def test_celeba_identity_users_from_train_warn_that_both_models_saw_them(tmp_path):
    make_celeba(tmp_path)
    spec = CelebAUsers(tmp_path, num_users=1, batch_size=2, split="train", target="identity")
    with pytest.warns(UserWarning, match=r"split 'train'.*identity_holdout share.*ddpm_celeba\.yaml.*split: holdout"):
        spec.check()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attribute targets and other splits: no warning
        CelebAUsers(tmp_path, num_users=1, batch_size=2, split="test", target="Male").check()


def test_celeba_holdout_split_is_the_identity_victims_held_out_photos(tmp_path):
    """split 'holdout': the photos CelebADataModule(target='identity') holds out for val/test (same fraction and
    seed), labelled with the victim's classes (the sorted train identities)."""
    from datamodules.celeba import identity_holdout_split

    gt = make_celeba(tmp_path)
    dm = CelebADataModule(tmp_path, target="identity", batch_size=2, identity_holdout=0.5, seed=3)
    dm.setup()
    held = sorted(Path(p).name for p in dm._val.paths + dm._test.paths)
    trained = {Path(p).name for p in dm._train.paths}
    assert len(held) == 4 and not trained & set(held)  # 8 train-partition photos: 4 held out
    index = load_celeba_index(tmp_path)
    split = identity_holdout_split(index, 0.5, 3)
    assert sorted(index.files[r] for r in split["holdout"]) == held
    assert split["holdout"].tolist() == sorted(split["val"].tolist() + split["test"].tolist())

    by_ident = {}
    for name in held:
        by_ident.setdefault(gt[name][0], []).append(name)
    spec = CelebAUsers(tmp_path, num_users=len(by_ident), batch_size=1, split="holdout", target="identity",
                       identity_holdout=0.5, holdout_seed=3)
    assert spec.classes.tolist() == [5, 9] and spec.num_classes == 2  # the victim's classes, not the pool's
    with pytest.warns(UserWarning, match=r"split='holdout'.*did not train on these photos.*ddpm_celeba"):
        users = spec.users()
    assert {u.meta["identity"] for u in users} == set(by_ident)
    for u in users:
        assert set(u.meta["files"]) <= set(by_ident[u.meta["identity"]]) and not set(u.meta["files"]) & trained
        assert u.labels.tolist() == [[5, 9].index(u.meta["identity"])] and u.meta["split"] == "holdout"
        assert u.meta["num_available"] == len(by_ident[u.meta["identity"]])
        assert u.images.shape == (1, 3, 64, 64) and 0 <= float(u.images.min()) and float(u.images.max()) <= 1
    # the data module's split is unchanged: its val/test are the function's
    assert sorted(Path(p).name for p in dm._val.paths) == sorted(index.files[r] for r in split["val"])
    with pytest.raises(ValueError, match=r"split='holdout'.*needs target: identity.*split: test"):
        CelebAUsers(tmp_path, split="holdout", target="Male")
    with pytest.raises(ValueError, match=r"identity_holdout must be in \(0, 1\)"):
        CelebAUsers(tmp_path, split="holdout", target="identity", identity_holdout=0.0)


def test_users_image_settings_are_checked_before_any_model_loads(tmp_path):
    """channels 2 or image_size 0 passed check() and failed in users(), after the victim and prior had loaded."""
    from datamodules.users import FashionMNISTUsers

    for kw, match in (({"channels": 2}, "channels must be 1"), ({"image_size": 0}, "image_size must be an integer")):
        with pytest.raises(ValueError, match=match):
            FashionMNISTUsers(root=str(tmp_path / "not_read"), **kw).check()  # before the data is looked for
        with pytest.raises(ValueError, match=match):
            FolderUsers(root=str(tmp_path / "not_read"), **kw).check()
