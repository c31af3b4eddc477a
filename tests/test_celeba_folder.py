"""CelebA reader/users/DataModule and image-folder users/DataModule on tiny fixtures built in tmp_path."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.celeba import CelebADataModule, CelebAUsers, find_celeba_root, load_celeba_image
from datamodules.fashion_mnist import DataNotFoundError
from datamodules.folder import FolderUsers, ImageFolderDataModule, ImageListDataset, load_image

ATTRS = ["5_o_Clock_Shadow", "Male", "Smiling"]
# identity -> (partition, number of images); test identities 3, 7, 12; train 5, 9; valid 11
IDENTITIES = {7: (2, 4), 3: (2, 3), 12: (2, 2), 5: (0, 5), 9: (0, 3), 11: (1, 2)}


def _noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def make_celeba(root: Path, files: tuple = ("identity", "attr", "partition")) -> dict:
    """CelebA in torchvision's layout under root/celeba; returns {file: (identity, partition, {attr: 0/1})}."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(123)
    entries = [(ident, part) for ident, (part, n) in IDENTITIES.items() for _ in range(n)]
    entries = [entries[i] for i in rng.permutation(len(entries))]  # identities interleaved in file order
    gt = {}
    for k, (ident, part) in enumerate(entries):
        name = f"{k + 1:06d}.jpg"
        _noise(178, 218, seed=k).save(base / "img_align_celeba" / name, quality=95)
        gt[name] = (ident, part, {a: int(v) for a, v in zip(ATTRS, rng.integers(0, 2, size=len(ATTRS)))})
    if "identity" in files:
        (base / "identity_CelebA.txt").write_text("".join(f"{f} {g[0]}\n" for f, g in gt.items()))
    if "partition" in files:
        (base / "list_eval_partition.txt").write_text("".join(f"{f} {g[1]}\n" for f, g in gt.items()))
    if "attr" in files:
        lines = [f"{len(gt)}\n", " ".join(ATTRS) + " \n"]  # trailing space and double spaces as in the real file
        lines += [f + "  " + "  ".join("1" if g[2][a] else "-1" for a in ATTRS) + "\n" for f, g in gt.items()]
        (base / "list_attr_celeba.txt").write_text("".join(lines))
    return gt


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba_root")
    return root, make_celeba(root)


# ------------------------------------------------------------------------------------------------ preprocessing
def test_centre_crop_white_centre_black_borders(tmp_path):
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    arr[20:198] = 255  # the central 178x178 square is white, 20 black rows above and below
    Image.fromarray(arr).save(tmp_path / "c.png")
    Image.fromarray(arr).save(tmp_path / "c.jpg", quality=100)
    x = load_celeba_image(tmp_path / "c.png", 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.all(x == 1.0)
    assert load_celeba_image(tmp_path / "c.jpg", 64).min() > 0.95
    # without the crop, a plain resize keeps the black borders: the test above is not vacuous
    plain = np.asarray(Image.fromarray(arr).resize((64, 64), Image.BILINEAR))
    assert plain[0].max() < 128 and plain[-1].max() < 128


def test_load_image_matches_torchvision_celeba_transform(tmp_path):
    from torchvision import transforms as T

    _noise(178, 218, seed=5).save(tmp_path / "a.png")
    ref = T.Compose([T.CenterCrop(178), T.Resize(64), T.ToTensor()])(Image.open(tmp_path / "a.png").convert("RGB"))
    assert torch.equal(load_celeba_image(tmp_path / "a.png", 64), ref)
    # folder images: crop the largest centred square (60x40 -> 40x40), then resize
    arr = np.zeros((40, 60), dtype=np.uint8)
    arr[:, 10:50] = 255
    Image.fromarray(arr, "L").save(tmp_path / "wide.png")
    y = load_image(tmp_path / "wide.png", 16, channels=1)
    assert y.shape == (1, 16, 16) and torch.all(y == 1.0)
    assert load_image(tmp_path / "wide.png", 16, channels=3).shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------ CelebA files
def test_celeba_missing_files_error(tmp_path):
    make_celeba(tmp_path, files=("identity",))
    with pytest.raises(DataNotFoundError) as err:
        CelebAUsers(tmp_path, num_users=1, batch_size=1, target="Male").check()
    msg = str(err.value)
    for part in ("list_attr_celeba.txt", "list_eval_partition.txt", "users.init_args.root", "data.init_args.root"):
        assert part in msg
    assert "identity_CelebA.txt" in msg and "img_align_celeba" in msg  # the expected layout is spelled out
    assert "missing" in msg and str(tmp_path / "celeba" / "list_attr_celeba.txt") in msg
    with pytest.raises(DataNotFoundError, match="not set"):
        CelebADataModule(root=None).prepare_data()
    with pytest.raises(DataNotFoundError, match="img_align_celeba") as err:
        find_celeba_root(tmp_path / "nowhere")
    # nothing there: the missing paths are torchvision's layout under ROOT/celeba, as README says
    assert f"missing {tmp_path / 'nowhere' / 'celeba' / 'img_align_celeba'}/," in str(err.value)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "list_attr_celeba.txt").write_text("0\n")
    with pytest.raises(DataNotFoundError) as err:  # ROOT is (part of) the celeba folder itself
        find_celeba_root(tmp_path / "flat")
    assert f"missing {tmp_path / 'flat' / 'img_align_celeba'}/," in str(err.value)
    assert "flat/list_attr_celeba.txt" not in str(err.value).split(". Expected")[0]
    (tmp_path / "zipped").mkdir()
    (tmp_path / "zipped" / "img_align_celeba.zip").write_bytes(b"PK")  # the download, not yet unzipped, in ROOT
    with pytest.raises(DataNotFoundError) as err:
        find_celeba_root(tmp_path / "zipped")
    assert f"unzip it so that {tmp_path / 'zipped' / 'img_align_celeba'}/ holds the images" in str(err.value)


def test_celeba_missing_image_error(tmp_path):
    make_celeba(tmp_path)
    for f in (tmp_path / "celeba" / "img_align_celeba").iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match="is missing"):
        CelebAUsers(tmp_path, num_users=1, batch_size=1, target="Male").check()


def test_celeba_unreadable_image_fails_the_check(tmp_path):
    make_celeba(tmp_path)
    spec = CelebAUsers(tmp_path, num_users=3, batch_size=2, seed=0, target="Male")
    spec.check()
    victim_file = spec.index().image_path(spec.plan()[1]["rows"][0])
    victim_file.write_bytes(b"not a jpeg")  # a damaged copy of one image a user takes
    with pytest.raises(ValueError, match=rf"1 of the 6 CelebA images .*{victim_file.name} .*extract img_align_celeba"):
        spec.check()


def test_celeba_root_may_be_the_celeba_folder(celeba):
    root, _ = celeba
    assert find_celeba_root(root) == find_celeba_root(root / "celeba") == root / "celeba"
    a = CelebAUsers(root, num_users=2, batch_size=2, target="Male").users()
    b = CelebAUsers(str(root / "celeba"), num_users=2, batch_size=2, target="Male").users()
    assert [u.meta["files"] for u in a] == [u.meta["files"] for u in b]


# ------------------------------------------------------------------------------------------------ CelebA users
def test_celeba_users_identity(celeba):
    root, gt = celeba
    spec = CelebAUsers(root, num_users=3, batch_size=2, split="test", seed=0, target="Male")
    assert spec.identity_to_class == {3: 0, 7: 1, 12: 2} and spec.num_classes == 2
    users = spec.users()
    assert [u.user_id for u in users] == [0, 1, 2]
    assert sorted(u.meta["identity"] for u in users) == [3, 7, 12]  # distinct test identities
    for u in users:
        assert u.images.shape == (2, 3, 64, 64) and u.images.dtype == torch.float32
        assert 0.0 <= u.images.min() and u.images.max() <= 1.0 and u.images.std() > 0.02
        files = u.meta["files"]
        assert len(set(files)) == 2 and not u.meta["replacement"]
        assert all(gt[f][0] == u.meta["identity"] and gt[f][1] == 2 for f in files)
        male = [gt[f][2]["Male"] for f in files]
        assert u.labels.dtype == torch.int64 and u.labels.tolist() == male and u.num_classes == 2
        # attributes: per image and the majority, as in list_attr_celeba.txt
        for a in ATTRS:
            vals = [gt[f][2][a] for f in files]
            assert u.meta["image_attributes"][a] == vals
            assert u.meta["attributes"][a] == int(2 * sum(vals) > len(vals))
            assert u.meta["attribute_fractions"][a] == pytest.approx(np.mean(vals))
        ref = torch.stack([load_celeba_image(root / "celeba" / "img_align_celeba" / f, 64) for f in files])
        assert torch.equal(u.images, ref)
    # disjoint: no image shared between users
    all_files = [f for u in users for f in u.meta["files"]]
    assert len(all_files) == len(set(all_files))
    # reproducible for the same seed, user i independent of num_users / first_user
    again = CelebAUsers(root, num_users=3, batch_size=2, split="test", seed=0, target="Male").users()
    for u, v in zip(users, again):
        assert u.meta["files"] == v.meta["files"] and torch.equal(u.images, v.images)
    later = CelebAUsers(root, num_users=1, batch_size=2, split="test", seed=0, first_user=1, target="Male").users()
    assert later[0].user_id == 1 and later[0].meta["files"] == users[1].meta["files"]
    # the seed matters
    orders = {tuple(p["identity"] for p in CelebAUsers(root, 3, 2, seed=s).plan()) for s in range(8)}
    assert len(orders) > 1
    # identity labels (split 'train' only: the identity victim's classes): class k <-> the k-th sorted identity
    ident = CelebAUsers(root, num_users=2, batch_size=2, split="train", seed=0, target="identity")
    assert ident.identity_to_class == {5: 0, 9: 1} and ident.num_classes == 2
    for u in ident.users():
        cls = ident.identity_to_class[u.meta["identity"]]
        assert u.labels.dtype == torch.int64 and u.labels.tolist() == [cls, cls] and u.dominant_class == cls
        assert u.num_classes == 2 and u.label_histogram.tolist()[cls] == 2
        assert all(gt[f][0] == u.meta["identity"] and gt[f][1] == 0 for f in u.meta["files"])


def test_celeba_users_attribute_target(celeba):
    root, gt = celeba
    users = CelebAUsers(root, num_users=2, batch_size=3, split="train", target="Male", seed=1).users()
    assert sorted(u.meta["identity"] for u in users) == [5, 9]
    for u in users:
        male = [gt[f][2]["Male"] for f in u.meta["files"]]
        assert u.labels.tolist() == male and u.num_classes == 2
        assert u.dominant_class == int(2 * sum(male) > 3) == u.meta["attributes"]["Male"]
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Bald'.*Smiling"):
        CelebAUsers(root, num_users=1, batch_size=1, target="Bald").check()


def test_celeba_batch_larger_than_identity(celeba, monkeypatch):
    root, gt = celeba
    import datamodules.celeba as celeba_mod

    def no_loading(*args, **kwargs):
        raise AssertionError("images loaded before the batch-size check")

    monkeypatch.setattr(celeba_mod, "load_images", no_loading)
    with pytest.raises(ValueError, match="batch_size=5") as err:
        CelebAUsers(root, num_users=1, batch_size=5, split="test", target="Male").users()
    assert "allow_replacement" in str(err.value) and "min_images" in str(err.value)
    assert "largest identity has 4 images" in str(err.value)
    monkeypatch.undo()
    users = CelebAUsers(root, num_users=3, batch_size=6, split="test", allow_replacement=True, target="Male").users()
    for u in users:
        files = u.meta["files"]
        own = {f for f, g in gt.items() if g[0] == u.meta["identity"] and g[1] == 2}
        assert len(files) == 6 and set(files) == own and u.meta["replacement"]  # every image at least once
        assert u.images.shape == (6, 3, 64, 64) and u.meta["num_available"] == len(own)
        for i, j in [(i, j) for i in range(6) for j in range(6) if i < j and files[i] == files[j]]:
            assert torch.equal(u.images[i], u.images[j])
    again = CelebAUsers(root, num_users=3, batch_size=6, split="test", allow_replacement=True, target="Male").users()
    assert [u.meta["files"] for u in users] == [u.meta["files"] for u in again]
    # min_images keeps only identities that have enough images
    ok = CelebAUsers(root, num_users=2, batch_size=3, split="test", min_images=3, target="Male").users()
    assert sorted(u.meta["identity"] for u in ok) == [3, 7]
    with pytest.raises(ValueError, match="only 2 identities with >= 3 images"):
        CelebAUsers(root, num_users=3, batch_size=3, split="test", min_images=3, target="Male").check()
    with pytest.raises(ValueError, match="split 'valid' has only 1 identities"):
        CelebAUsers(root, num_users=2, batch_size=1, split="valid", target="Male").check()


# ------------------------------------------------------------------------------------------------ CelebA DataModule
def test_celeba_datamodule_attribute(celeba):
    root, gt = celeba
    dm = CelebADataModule(root, target="Male", image_size=32, batch_size=4)
    assert dm.num_classes == 2 and dm.channels == 3 and dm.image_size == 32
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm._train), len(dm._val), len(dm._test)) == (8, 2, 9)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    xv, yv = next(iter(dm.val_dataloader()))
    files = [Path(p).name for p in dm._val.paths]
    assert all(gt[f][1] == 1 for f in files) and yv.tolist() == [gt[f][2]["Male"] for f in files]
    assert torch.equal(xv[0], load_celeba_image(dm._val.paths[0], 32))
    with pytest.raises(ValueError, match="unknown CelebA attribute"):
        CelebADataModule(root, target="male").prepare_data()


def test_celeba_datamodule_identity(celeba):
    root, gt = celeba
    dm = CelebADataModule(root, target="identity", batch_size=2, identity_holdout=0.25)
    assert dm.num_classes == 2 and dm.classes.tolist() == [5, 9]
    dm.setup()
    assert (len(dm._train), len(dm._val), len(dm._test)) == (6, 1, 1)
    everything = dm._train.paths + dm._val.paths + dm._test.paths
    assert sorted(Path(p).name for p in everything) == sorted(f for f, g in gt.items() if g[1] == 0)
    for ds in (dm._train, dm._val, dm._test):
        assert [gt[Path(p).name][0] for p in ds.paths] == [[5, 9][c] for c in ds.labels.tolist()]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 64, 64) and y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="fewer than data.init_args.batch_size"):
        CelebADataModule(root, target="identity", batch_size=64).setup()


# ------------------------------------------------------------------------------------------------ folder users
@pytest.fixture()
def user_folders(tmp_path):
    root = tmp_path / "lfw"
    specs = (("bob", 3, "jpg", (30, 50)), ("alice", 4, "png", (40, 30)), ("carol", 2, "jpeg", (32, 32)))
    for j, (name, n, ext, size) in enumerate(specs):
        (root / name).mkdir(parents=True)
        for k in range(n):
            _noise(*size, seed=10 * j + k).save(root / name / f"{name}_{k:04d}.{ext}")
    (root / "carol" / "notes.txt").write_text("not an image")
    (root / "dave").mkdir()  # empty: skipped with a warning
    (root / "README.txt").write_text("LFW")
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder holding an image: never a user
    _noise(32, 32, seed=99).save(root / ".ipynb_checkpoints" / "x.png")
    return root


def test_folder_users(user_folders):
    with pytest.warns(UserWarning, match="dave"):
        spec = FolderUsers(str(user_folders), batch_size=2, seed=0)
        users = spec.users()
    assert [u.user_id for u in users] == ["alice", "bob", "carol"]
    for k, u in enumerate(users):
        assert u.images.shape == (2, 3, 64, 64) and u.images.dtype == torch.float32
        assert 0.0 <= u.images.min() and u.images.max() <= 1.0
        assert u.labels.tolist() == [0, 0] and u.num_classes == 1 and u.dominant_class == 0
        assert u.meta["identity"] == u.user_id and u.meta["index"] == k
        assert len(set(u.meta["files"])) == 2 and all(f.startswith(u.user_id + "_") for f in u.meta["files"])
        ref = torch.stack([load_image(user_folders / u.user_id / f, 64) for f in u.meta["files"]])
        assert torch.equal(u.images, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = FolderUsers(str(user_folders), batch_size=2, seed=0).users()
        assert [u.meta["files"] for u in again] == [u.meta["files"] for u in users]
        assert all(torch.equal(u.images, v.images) for u, v in zip(users, again))
        two = FolderUsers(str(user_folders), batch_size=2, num_users=2, label_mode="index", channels=1).users()
        assert [u.user_id for u in two] == ["alice", "bob"]
        assert [u.labels.tolist() for u in two] == [[0, 0], [1, 1]] and two[1].num_classes == 2
        assert two[0].images.shape == (2, 1, 64, 64) and two[0].meta["files"] == users[0].meta["files"]
        # B larger than a folder
        with pytest.raises(ValueError, match=r"batch_size=3.*carol \(2\).*allow_replacement"):
            FolderUsers(str(user_folders), batch_size=3).check()
        rep = FolderUsers(str(user_folders), batch_size=3, allow_replacement=True, image_size=16).users()
        carol = rep[2]
        assert carol.meta["replacement"] and set(carol.meta["files"]) == {"carol_0000.jpeg", "carol_0001.jpeg"}
        assert carol.images.shape == (3, 3, 16, 16) and not rep[0].meta["replacement"]
        big = FolderUsers(str(user_folders), batch_size=3, min_images=3).users()
        assert [u.user_id for u in big] == ["alice", "bob"]
        with pytest.raises(ValueError, match="only 3 user subfolders"):
            FolderUsers(str(user_folders), batch_size=1, num_users=4).check()


def test_folder_users_errors(tmp_path, user_folders):
    with pytest.raises(DataNotFoundError, match="users.init_args.root"):
        FolderUsers(str(tmp_path / "missing"), batch_size=1).check()
    flat = tmp_path / "flat"
    flat.mkdir()
    _noise(8, 8, 0).save(flat / "a.png")
    with pytest.raises(DataNotFoundError, match="directly in .*ImageFolderDataModule"):
        FolderUsers(str(flat), batch_size=1).check()
    (user_folders / "alice" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"1 of the 5 images .* cannot be read as images: .*broken\.jpg .*re-encode"):
            FolderUsers(str(user_folders), batch_size=5, num_users=1).check()  # before any image is loaded


# ------------------------------------------------------------------------------------------------ image folder
def test_image_folder_datamodule(tmp_path):
    root = tmp_path / "ffhq"
    for k in range(10):
        sub = root / f"{k // 4:05d}" / ("deep" if k == 9 else "")
        sub.mkdir(parents=True, exist_ok=True)
        _noise(48, 40, seed=k).save(sub / f"{k:05d}.{'png' if k % 2 else 'jpg'}")
    (root / "LICENSE.txt").write_text("cc")
    dm = ImageFolderDataModule(str(root), image_size=32, batch_size=4, val_fraction=0.2)
    assert dm.image_size == 32 and dm.channels == 3
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm._train) == 8 and len(dm._val) == 2
    assert len(set(dm._train.paths) | set(dm._val.paths)) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == torch.int64 and y.tolist() == [0, 0, 0, 0]
    grey = ImageFolderDataModule(str(root), image_size=16, channels=1, batch_size=2, val_fraction=0.0)
    grey.setup()
    assert len(grey._train) == 10 and next(iter(grey.train_dataloader()))[0].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="fewer than data.init_args.batch_size=16"):
        ImageFolderDataModule(str(root), batch_size=16).setup()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataNotFoundError, match=r"no \.jpg/\.jpeg/\.png image under .*data.init_args.root"):
        ImageFolderDataModule(str(empty)).prepare_data()
    with pytest.raises(DataNotFoundError, match="does not exist.*data.init_args.root"):
        ImageFolderDataModule(str(tmp_path / "nope")).prepare_data()


def test_horizontal_flip_augment(tmp_path):
    arr = np.zeros((16, 16), dtype=np.uint8)
    arr[:, :4] = 255  # white left edge: flipping is visible
    Image.fromarray(arr, "L").save(tmp_path / "edge.png")
    ds = ImageListDataset([tmp_path / "edge.png"], image_size=16, channels=1, hflip=True)
    base = load_image(tmp_path / "edge.png", 16, channels=1)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x, y = ds[0]
        assert y.dtype == torch.int64 and int(y) == 0
        assert torch.equal(x, base) or torch.equal(x, base.flip(-1))
        seen.add(torch.equal(x, base))
    assert seen == {True, False}


# ------------------------------------------------------------------------------------------------ files checked at setup
def test_celeba_datamodule_missing_image_fails_at_setup(tmp_path):
    gt = make_celeba(tmp_path)
    images = tmp_path / "celeba" / "img_align_celeba"
    train_files = sorted(f for f, g in gt.items() if g[1] == 0)
    test_files = sorted(f for f, g in gt.items() if g[1] == 2)
    for name in (train_files[1], test_files[0]):
        (images / name).unlink()
    (tmp_path / "celeba" / "img_align_celeba.zip").write_bytes(b"PK")
    dm = CelebADataModule(tmp_path, target="Male", batch_size=2)
    dm.prepare_data()  # the txt files are all there
    with pytest.raises(DataNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert f"2 of the {len(gt)} CelebA images used" in msg
    assert f"{min(train_files[1], test_files[0])}, {max(train_files[1], test_files[0])}." in msg
    assert str(images) in msg and "unzip it completely" in msg and "data.init_args.root" in msg
    assert dm._train is None  # nothing built, nothing to fail later inside a DataLoader worker
    # identity target: only the train partition is used, so a missing test image does not matter
    ident = CelebADataModule(tmp_path, target="identity", batch_size=2, identity_holdout=0.25)
    with pytest.raises(DataNotFoundError, match=rf"1 of the {len(train_files)} CelebA images used .*{train_files[1]}"):
        ident.setup()
    _noise(178, 218, seed=99).save(images / train_files[1], quality=95)
    ident.setup()
    assert len(ident._train) + len(ident._val) + len(ident._test) == len(train_files)


def test_image_folder_skips_hidden_files_and_rejects_corrupt_images_at_setup(tmp_path):
    root = tmp_path / "ffhq"
    (root / "sub").mkdir(parents=True)
    for k in range(6):
        _noise(40, 40, seed=k).save((root if k < 3 else root / "sub") / f"{k:05d}.jpg")
    # macOS AppleDouble companions and other hidden files / folders: not images, never listed
    (root / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (root / "sub" / "._00003.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (root / ".hidden.png").write_bytes(b"junk")
    (root / ".thumbs").mkdir()
    _noise(40, 40, seed=7).save(root / ".thumbs" / "t.jpg")
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    assert sorted(Path(p).name for p in dm._train.paths) == [f"{k:05d}.jpg" for k in range(6)]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16)
    # a corrupt (not hidden) file is one clear error at setup, naming it, before any batch is drawn
    (root / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "empty.png").write_bytes(b"")
    bad = ImageFolderDataModule(str(root), image_size=16, batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError) as err:
        bad.setup("fit")
    msg = str(err.value)
    assert msg.startswith(f"2 of 8 image files under {root} cannot be read as images: ")
    assert str(root / "empty.png") in msg and str(root / "sub" / "broken.jpg") in msg
    assert "delete these files or re-encode them" in msg and "._00000.jpg" not in msg
    assert bad._train is None
    # the folder users skip AppleDouble files too
    users = root.parent / "users"
    (users / "amy").mkdir(parents=True)
    _noise(20, 20, seed=1).save(users / "amy" / "a.jpg")
    (users / "amy" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert [[p.name for p in f] for _, f in FolderUsers(str(users), batch_size=1).user_folders()] == [["a.jpg"]]


def test_load_image_scales_16_bit_grey_and_applies_exif_orientation(tmp_path):
    """A 16-bit grey ramp 0..65535 loads as a 0..1 ramp (Pillow's convert clipped it at 255: almost white), and a
    JPEG whose EXIF says 'rotate 90' (orientation 6) loads upright, as a viewer shows it."""
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    x = load_image(tmp_path / "ramp16.png", 16, channels=1)
    assert float(x.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(x[0, :, 0].mean()) < 0.02 and float(x[0, :, -1].mean()) > 0.98
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, :40] = 255  # left half white as stored; orientation 6 turns it into the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    y = load_image(tmp_path / "phone.jpg", 40, channels=1, crop=None)  # square centre crop of the upright 40x80
    assert y.shape == (1, 40, 40)
    # upright image is 40 wide x 80 tall with the white half on top; its centre crop has white top rows
    assert float(y[0, :5].mean()) > 0.9 and float(y[0, -5:].mean()) < 0.1


def test_face_gallery_is_the_same_for_a_split_run_and_a_full_run(celeba, monkeypatch):
    """The identity columns' impostors: with evaluation.face_gallery_users K the user of a split run (first_user 2)
    is compared with the same photos as in one full run (the run's other users differ: none in the split run)."""
    import attack
    from inversion import faces

    root, _ = celeba
    full = CelebAUsers(root, num_users=3, batch_size=2, seed=0, target="Male")
    split = CelebAUsers(root, num_users=1, batch_size=2, seed=0, first_user=2, target="Male")
    gallery = split.gallery(3)
    assert (split.first_user, split.num_users) == (2, 1)  # the source itself is unchanged
    full_users, gallery_users, split_users = full.users(), gallery.users(), split.users()
    assert [u.user_id for u in gallery_users] == [0, 1, 2]
    assert all(torch.equal(a.images, b.images) for a, b in zip(full_users, gallery_users))
    with pytest.raises(ValueError, match="at least one user"):
        split.gallery(0)

    seen = []
    monkeypatch.setattr(faces, "face_report", lambda x_hat, user_images, others, male_attr=None: seen.append(others) or {})
    final = torch.rand(1, 3, 64, 64)

    def init(k):
        return attack.Namespace(evaluation=attack.Namespace(faces=True, face_gallery_users=k))

    row = attack.face_columns(final, split_users[0], *attack.face_gallery(init(3), split, split_users))
    attack.face_columns(final, full_users[2], *attack.face_gallery(init(0), full, full_users))
    attack.face_columns(final, split_users[0], *attack.face_gallery(init(0), split, split_users))
    assert row["id_gallery"] == "users 0-2"
    with_gallery, full_run, split_run = seen
    assert len(with_gallery) == len(full_run) == 2 and len(split_run) == 0  # the user itself left out
    assert all(torch.equal(a, b) for a, b in zip(with_gallery, full_run))
    assert not any(torch.equal(o, split_users[0].images) for o in with_gallery)


def test_image_folder_follows_symlinked_folders_once_and_survives_a_cycle(tmp_path):
    """os.walk without followlinks skipped a symlinked sub-folder silently (the prior trained on 2 of 5 images);
    now links are followed like torchvision's ImageFolder, each real folder once, and a link back up ends."""
    from datamodules.folder import find_images

    elsewhere = tmp_path / "elsewhere" / "part2"
    elsewhere.mkdir(parents=True)
    for k in range(3):
        _noise(24, 24, seed=10 + k).save(elsewhere / f"b{k}.png")
    root = tmp_path / "ffhq"
    (root / "part1").mkdir(parents=True)
    for k in range(2):
        _noise(24, 24, seed=k).save(root / "part1" / f"a{k}.jpg")
    (root / "part2").symlink_to(elsewhere, target_is_directory=True)
    (root / "part1" / "loop").symlink_to(root, target_is_directory=True)  # a cycle: part1/loop/part1/loop/...
    (root / "z_again").symlink_to(root / "part1", target_is_directory=True)  # a second path to part1: not listed
    found = find_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "part1/a0.jpg", "part1/a1.jpg", "part2/b0.png", "part2/b1.png", "part2/b2.png"]  # was the first two only
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    assert sorted(Path(p).name for p in dm._train.paths) == ["a0.jpg", "a1.jpg", "b0.png", "b1.png", "b2.png"]
    # a symlinked root is followed too
    (tmp_path / "root_link").symlink_to(root, target_is_directory=True)
    assert len(find_images(tmp_path / "root_link")) == 5


def test_an_ffhq_root_with_two_resolutions_side_by_side_is_refused_with_the_folder_to_use(tmp_path):
    """FFHQ's download script writes images1024x1024/ and thumbnails128x128/ into one root: that root listed every
    face twice (a review measured 20 of 50 faces in both the training and the validation split)."""
    from datamodules.folder import find_images

    root = tmp_path / "ffhq"
    for version in ("images1024x1024", "thumbnails128x128"):
        (root / version / "00000").mkdir(parents=True)
        for k in range(2):
            _noise(24, 24, seed=k).save(root / version / "00000" / f"0000{k}.png")
    with pytest.raises(ValueError, match=r"images1024x1024 and thumbnails128x128 side by side.*root` to one of them"):
        find_images(root)
    with pytest.raises(ValueError, match="side by side"):
        ImageFolderDataModule(str(root), image_size=16, batch_size=2).setup("fit")
    assert len(find_images(root / "thumbnails128x128")) == 2  # one version: fine
    with pytest.raises(ValueError, match=f"e.g. {root / 'images1024x1024'}"):  # the folder that exists, not ROOT/x
        find_images(tmp_path)


def test_celeba_users_name_attribute_classes_and_leave_identities_as_ids(tmp_path):
    make_celeba(tmp_path)
    assert CelebAUsers(tmp_path, num_users=1, batch_size=1, target="Male").class_names == ("not Male", "Male")
    assert CelebAUsers(tmp_path, num_users=1, batch_size=1, target="identity").class_names is None
