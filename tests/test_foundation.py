"""Data, victim/evaluator, DDPM prior, export and train.py (issue: foundation)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline

from callbacks.export import ExportModel
from datamodules.fashion_mnist import (
    DataNotFoundError,
    FashionMNISTDataModule,
    find_fashion_mnist_root,
    read_idx,
    to_tensor_images,
)
from datamodules.users import build_label_skewed_users
from inversion.prior import DiffusionPrior, load_ddpm
from lightning_modules.classifier import ImageClassifier, build_classifier, load_classifier, save_classifier
from lightning_modules.ddpm import DDPMPrior
from tests.helpers import write_fake_fmnist

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "fashion_mnist"


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST in the idx layout: 200 train and 100 test images, label = index % 10."""
    return write_fake_fmnist(tmp_path)


# ------------------------------------------------------------------------------------------------ data
def test_idx_reader_and_padding(fake_fmnist):
    imgs = read_idx(fake_fmnist / "t10k-images-idx3-ubyte")
    assert imgs.shape == (100, 28, 28) and imgs.dtype == np.uint8
    x = to_tensor_images(imgs[:2], 32, 1)
    assert x.shape == (2, 1, 32, 32) and x[:, :, :2].abs().sum() == 0 and x[:, :, :, -2:].abs().sum() == 0
    torch.testing.assert_close(x[0, 0, 2:30, 2:30], torch.from_numpy(imgs[0]).float() / 255)
    assert to_tensor_images(imgs[:2], 32, 3).shape == (2, 3, 32, 32)


def test_missing_data_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist_root(str(tmp_path / "empty"), download=False)


def test_datamodule_batches(fake_fmnist):
    dm = FashionMNISTDataModule(root=str(fake_fmnist), batch_size=16, val_size=40)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.int64 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert len(dm._train) == 160 and len(dm._val) == 40


def test_users_reproducible_disjoint_and_skewed():
    n = 600
    labels = torch.arange(n) % 10
    images = torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 2, 2) / n
    a = build_label_skewed_users(images, labels, num_users=6, batch_size=20, num_classes=10, dominant_fraction=0.8, seed=3)
    b = build_label_skewed_users(images, labels, num_users=3, batch_size=20, num_classes=10, dominant_fraction=0.8, seed=3)
    for ua, ub in zip(a, b):  # user i is the same whatever num_users is
        assert ua.meta["indices"] == ub.meta["indices"]
    idx = [i for u in a for i in u.meta["indices"]]
    assert len(idx) == len(set(idx)) == 120  # disjoint
    for u in a:
        assert u.label_histogram[u.dominant_class] == 16 and u.batch_size == 20
        assert torch.equal(labels[u.meta["indices"]], u.labels)
    assert len({u.dominant_class for u in a}) == 6  # round-robin over a permutation of the classes
    later = build_label_skewed_users(images, labels, 2, 20, 10, 0.8, seed=3, first_user=4)
    assert [u.meta["indices"] for u in later] == [a[4].meta["indices"], a[5].meta["indices"]]
    d = build_label_skewed_users(images, labels, 5, 30, 10, dirichlet_alpha=0.1, seed=0)
    assert all(u.label_histogram.sum() == 30 for u in d)
    assert np.mean([u.label_histogram.max().item() / 30 for u in d]) > 0.5  # alpha = 0.1: strongly skewed
    with pytest.raises(ValueError, match="dominant_fraction"):
        build_label_skewed_users(images, labels, 1, 5, 10, dominant_fraction=0.0)
    one = labels == labels[0]  # a split of a single class: p = 1 works, p < 1 has nothing to mix in
    only = build_label_skewed_users(images[one], labels[one], 1, 4, 10, dominant_fraction=1.0)
    assert only[0].labels.tolist() == [int(labels[0])] * 4
    with pytest.raises(ValueError, match=r"only class \[\d\]"):
        build_label_skewed_users(images[one], labels[one], 1, 4, 10, dominant_fraction=0.5)


# ------------------------------------------------------------------------------------------------ models
def test_victim_shape_stem_and_training_step_lowers_loss():
    torch.manual_seed(0)
    net = build_classifier("resnet18", 1, 10, 32)
    assert net[1].conv1.kernel_size == (3, 3) and net[1].conv1.stride == (1, 1)
    assert isinstance(net[1].maxpool, torch.nn.Identity)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    module = ImageClassifier(arch="convnet", lr=3e-3)
    opt = module.configure_optimizers()
    x, y = torch.rand(32, 1, 32, 32), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="unknown classifier arch"):
        build_classifier("vgg", 1, 10)


def test_classifier_save_load_roundtrip_and_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(arch="convnet", in_channels=1, num_classes=10)
    module.eval()
    module.export(tmp_path / "a")
    model, cfg = load_classifier(tmp_path / "a")
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(model(x), module(x))
    assert cfg["arch"] == "convnet" and (tmp_path / "a" / "model.safetensors").is_file()
    cfg["arch"] = "resnet18"
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not hold a resnet18"):
        load_classifier(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_classifier(tmp_path / "missing")


def test_ddpm_training_step_and_export_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = DDPMPrior(image_size=8, block_out_channels=(32, 32), layers_per_block=1, sample_every_n_steps=0, lr=2e-3)
    x = torch.rand(16, 1, 8, 8)
    opt = torch.optim.AdamW(m.unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = float(m.diffusion_loss(x, generator=torch.Generator().manual_seed(1)))
    for _ in range(30):
        loss = m.diffusion_loss(x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(m.diffusion_loss(x, generator=torch.Generator().manual_seed(1))) < first
    m.ema_unet.load_state_dict(m.unet.state_dict())
    m.export(tmp_path / "ddpm")
    assert (tmp_path / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet, sched = load_ddpm(str(tmp_path / "ddpm"))
    import os

    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path)  # a prior path under ~ (a YAML 'prior: {path: ~/...}') is expanded
    try:
        assert load_ddpm("~/ddpm")[0].config.sample_size == 8
    finally:
        os.environ["HOME"] = old_home if old_home is not None else ""
    xt, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(unet(xt, t).sample, m.unet.eval()(xt, t).sample)
    assert isinstance(DDPMPipeline.from_pretrained(str(tmp_path / "ddpm")), DDPMPipeline)
    prior = DiffusionPrior(unet, sched, (1, 8, 8))
    assert torch.isfinite(prior.prior_loss(torch.rand(1, 1, 8, 8), 100))
    warm = DDPMPrior(image_size=8, block_out_channels=(32, 32), layers_per_block=1, init_weights=str(tmp_path / "ddpm"))
    with torch.no_grad():
        torch.testing.assert_close(warm.ema_unet(xt, t).sample, unet(xt, t).sample)
    with pytest.raises(ValueError, match="differs"):
        DDPMPrior(image_size=8, block_out_channels=(32, 64), layers_per_block=1, init_weights=str(tmp_path / "ddpm"))


def test_export_callback_refuses_to_overwrite(tmp_path):
    (tmp_path / "exists").mkdir()
    cb = ExportModel(str(tmp_path / "exists"))

    class T:
        ckpt_path = None

    with pytest.raises(FileExistsError, match="already exists"):
        cb.on_fit_start(T(), None)
    T.ckpt_path = "last.ckpt"  # a resumed run keeps exporting into its folder
    cb.on_fit_start(T(), None)


# ------------------------------------------------------------------------------------------------ train.py
def _fake_cfg(tmp_path: Path, data_root: Path, model: dict) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": model,
        "data": {"class_path": "datamodules.fashion_mnist.FashionMNISTDataModule",
                 "init_args": {"root": str(data_root), "batch_size": 8, "val_size": 40}},
        "trainer": {"max_steps": 3, "limit_val_batches": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "tr"),
                    "callbacks": [{"class_path": "callbacks.export.ExportModel",
                                   "init_args": {"dirpath": str(tmp_path / "export"), "title": "tiny", "sample_grid": False}}]},
        "test_after_fit": False,
    }
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_train_py_runs_exports_and_writes_a_model_card(tmp_path, fake_fmnist):
    import train

    model = {"class_path": "lightning_modules.classifier.ImageClassifier", "init_args": {"arch": "convnet"}}
    train.main(["--config", str(_fake_cfg(tmp_path, fake_fmnist, model))])
    model_, cfg = load_classifier(tmp_path / "export")
    assert cfg["arch"] == "convnet"
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "python" in card and "optimiser steps: 3" in card
    summary = json.loads((tmp_path / "export" / "training_summary.json").read_text())
    assert summary["global_step"] == 3


def test_train_py_rejects_mismatched_shapes_and_unknown_keys(tmp_path, fake_fmnist, capsys):
    import train

    model = {"class_path": "lightning_modules.classifier.ImageClassifier", "init_args": {"arch": "convnet", "image_size": 64}}
    with pytest.raises(train.ConfigMismatchError, match="image_size"):
        train.main(["--config", str(_fake_cfg(tmp_path, fake_fmnist, model))])
    model = {"class_path": "lightning_modules.classifier.ImageClassifier", "init_args": {"arch": "convnet", "widht": 3}}
    with pytest.raises(SystemExit):
        train.main(["--config", str(_fake_cfg(tmp_path, fake_fmnist, model))])
    assert "widht" in capsys.readouterr().err


def test_a_num_classes_clash_names_only_options_that_exist():
    """CelebA's data module derives num_classes from its target: the fix told users to set data.init_args.num_classes,
    an option it refuses. Only the model key is named then; a data module that takes the option keeps both."""
    import train
    from lightning_modules.classifier import ImageClassifier

    class Derived:  # like CelebADataModule: num_classes follows from the target, not an init argument
        def __init__(self, target: str = "identity"):
            self.num_classes, self.image_size, self.channels = 8, 32, 1

    class Given:
        def __init__(self, num_classes: int = 8):
            self.num_classes, self.image_size, self.channels = num_classes, 32, 1

    model = ImageClassifier(arch="convnet", num_classes=2, image_size=32, in_channels=1)
    with pytest.raises(train.ConfigMismatchError, match=r"num_classes: model has 2, data has 8\. The data \(Derived\) "
                       r"gives 8 from its other settings: set model.init_args.num_classes: 8\.$"):
        train.check_data_model_agree(model, Derived())
    with pytest.raises(train.ConfigMismatchError, match=r"Set model.init_args.num_classes and data.init_args.num_classes"):
        train.check_data_model_agree(model, Given())


# ------------------------------------------------------------------------------------------------ shipped
needs_shipped = pytest.mark.skipif(not (SHIPPED / "victim_resnet18" / "config.json").is_file(), reason="no shipped checkpoints")


@needs_shipped
def test_shipped_checkpoints_load_and_classify():
    try:
        from datamodules.fashion_mnist import load_split
        raw, labels = load_split("test", download=False)
    except DataNotFoundError:
        pytest.skip("needs dataset-fashion-mnist")
    x = to_tensor_images(raw[:500], 32, 1)
    y = torch.from_numpy(labels[:500].astype(np.int64))
    for name in ("victim_resnet18", "evaluator_convnet"):
        model, cfg = load_classifier(SHIPPED / name)
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        assert acc >= 0.85, f"{name}: {acc:.3f} on 500 test images"
    unet, sched = load_ddpm(str(SHIPPED / "ddpm_32"))
    assert unet.config.sample_size == 32 and unet.config.in_channels == 1
    assert sched.config.prediction_type == "epsilon"


@needs_shipped
def test_shipped_prior_samples_are_recognisable_garments():
    """Quick form of the prior's bar (scripts/check_checkpoints.py: 500 DDIM-100 samples, mean top-1 >= 0.8, every
    class 0.5x..2x of uniform): 40 seeded DDIM-10 samples judged by the shipped evaluator. Measured on the shipped
    prior: mean top-1 0.853, 9 of 10 classes present; the 1,500-step prior it replaced gave 0.59 and 3 classes."""
    from lightning_modules.ddpm import sample_ddim

    unet, sched = load_ddpm(str(SHIPPED / "ddpm_32"))
    evaluator, _ = load_classifier(SHIPPED / "evaluator_convnet")
    x = sample_ddim(unet, sched, 40, num_inference_steps=10, seed=0)
    assert x.shape == (40, 1, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        probs = torch.softmax(evaluator(x), dim=1)
    classes = set(probs.argmax(1).tolist())
    assert float(probs.max(1).values.mean()) >= 0.75
    assert len(classes) >= 8, f"classes present: {sorted(classes)}"


def test_atomic_replace_dir_swaps_and_restores_the_old_folder_on_failure(tmp_path):
    from callbacks.export import atomic_replace_dir

    target, new = tmp_path / "ddpm", tmp_path / ".ddpm.tmp"
    target.mkdir(); (target / "v").write_text("old")
    new.mkdir(); (new / "v").write_text("new")
    atomic_replace_dir(new, target)
    assert (target / "v").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm"]  # the old folder is gone
    # a failing second rename (e.g. the temporary folder vanished) puts the old export back
    newer = tmp_path / ".ddpm.tmp2"
    with pytest.raises(OSError):
        atomic_replace_dir(newer, target)  # does not exist: its rename raises FileNotFoundError
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm"]


def test_atomic_replace_dir_fsyncs_the_new_files_before_the_rename(tmp_path, monkeypatch):
    """save_pretrained's files were renamed into place without an fsync: safe against a process crash, but a power
    loss could leave the export folder with empty weights. Every file and folder of the new export is fsynced before
    the rename, the parent folder after it."""
    from callbacks.export import atomic_replace_dir

    target, new = tmp_path / "ddpm", tmp_path / ".ddpm.tmp"
    (new / "unet").mkdir(parents=True)
    (new / "unet" / "w.safetensors").write_bytes(b"w" * 100)
    (new / "model_index.json").write_text("{}")
    inodes = {p.stat().st_ino: p.name for p in (new, new / "unet", new / "unet" / "w.safetensors",
                                                 new / "model_index.json")}
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_ino, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_replace_dir(new, target)
    before_rename = {ino for ino, moved in synced if not moved}
    assert set(inodes) <= before_rename, [inodes[i] for i in set(inodes) - before_rename]
    assert (tmp_path.stat().st_ino, True) in synced  # the parent, after the rename
    assert (target / "unet" / "w.safetensors").read_bytes() == b"w" * 100


def test_attack_users_need_only_the_test_split(tmp_path, monkeypatch):
    """attack.py's users come from the test split: a folder with only the t10k files serves them (a GPU machine is
    sent only those), while the training data module still asks for the train files and names them."""
    from datamodules.users import FashionMNISTUsers

    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(tmp_path / "nowhere"))
    (tmp_path / "full").mkdir()
    full = write_fake_fmnist(tmp_path / "full")
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    for f in full.glob("t10k-*"):
        (only_test / f.name).write_bytes(f.read_bytes())
    source = FashionMNISTUsers(num_users=2, batch_size=5, root=str(only_test), image_size=32)
    source.check()
    users = source.users()
    assert len(users) == 2 and users[0].images.shape == (5, 1, 32, 32)
    from datamodules.fashion_mnist import load_split

    images, labels = load_split("test", str(only_test), download=False)
    assert images.shape == (100, 28, 28) and list(labels[:3]) == [0, 1, 2]
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"):
        FashionMNISTDataModule(root=str(only_test)).prepare_data()
    with pytest.raises(ValueError, match="splits must be"):
        find_fashion_mnist_root(str(full), download=False, splits=("val",))


def test_missing_shipped_style_checkpoint_names_the_config_that_trains_it(tmp_path):
    """The CelebA victim and prior are not shipped: the error says 'not found' and names the training config that
    exports that folder (it said the folder 'lacks config.json' and pointed at a Fashion-MNIST model)."""
    from lightning_modules.classifier import load_classifier

    with pytest.raises(FileNotFoundError, match=r"not found: train it with `python train.py --config "
                                                r"configs/train/victim_celeba.yaml`"):
        load_classifier("checkpoints/celeba/victim_resnet18_male")
    with pytest.raises(FileNotFoundError, match=r"not found: train it with `python train.py --config "
                                                r"configs/train/ddpm_celeba.yaml`"):
        load_ddpm("checkpoints/celeba/ddpm_64")
    with pytest.raises(FileNotFoundError, match="not found: give a folder written by train.py"):
        load_classifier(tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        load_classifier(tmp_path / "empty")


def test_explicit_fashion_mnist_root_is_the_only_place_looked_at(tmp_path, monkeypatch):
    """A mistyped root is an error naming it, not a silent fall-back to the Debian copy (which exists here)."""
    (tmp_path / "debian").mkdir()
    monkeypatch.setattr("datamodules.fashion_mnist.DEBIAN_ROOT", str(write_fake_fmnist(tmp_path / "debian")))
    assert find_fashion_mnist_root(None, download=False) == tmp_path / "debian"
    with pytest.raises(DataNotFoundError, match="typo"):
        find_fashion_mnist_root(str(tmp_path / "typo"), download=False)


def test_label_skew_ties_go_to_the_designed_dominant_class_and_bad_settings_fail_early(tmp_path):
    """p = 0.3 at B = 10: 3 images of the designed class; when another class also gets 3, the designed class is
    the user's dominant class (argmax sent ties to the lowest class id). p = 0.5 at B = 5 gives 3 images (round()
    gave 2). Out-of-range settings fail in check(), before any data or model is loaded."""
    from datamodules.users import FashionMNISTUsers, dominant_count

    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(2000, 1, 4, 4, generator=g), torch.arange(2000) % 10
    users = build_label_skewed_users(images, labels, num_users=200, batch_size=10, num_classes=10,
                                     dominant_fraction=0.3, seed=1)
    ties = 0
    for u in users:
        hist = torch.bincount(u.labels, minlength=10)
        designed = u.meta["designed_dominant"]
        assert int(hist[designed]) >= 3
        if int(hist.max()) == int(hist[designed]):
            assert u.dominant_class == designed
            ties += int((hist == hist.max()).sum()) > 1
        else:
            assert u.dominant_class == int(hist.argmax())
    assert ties > 10  # the case this test is about occurs
    assert dominant_count(0.5, 5) == 3 and dominant_count(0.25, 10) == 3 and dominant_count(1.0, 7) == 7
    assert dominant_count(0.7, 45) == 32 and dominant_count(0.58, 25) == 15 and dominant_count(0.29, 50) == 15  # p*B x.5
    for kw, match in (({"first_user": -5}, "first_user must be >= 0"), ({"dominant_fraction": 1.5}, r"\(0, 1\]"),
                      ({"dirichlet_alpha": 0.0}, "dirichlet_alpha must be > 0"), ({"batch_size": 0}, ">= 1")):
        with pytest.raises(ValueError, match=match):
            FashionMNISTUsers(root=str(tmp_path / "not_read"), **kw).check()


def test_input_paths_are_found_as_given_then_under_the_repository_root(tmp_path, monkeypatch):
    """One lookup rule for the victim, the prior and the evaluator (attack.py) and the report: a relative path is
    taken from the current directory when it exists there, else from the repository root; a missing path or a hub
    id comes back as written, so the loader's error names what the user wrote."""
    import attack
    from inversion.fsutils import REPO_ROOT, find_input_path

    monkeypatch.chdir(tmp_path)
    shipped = "checkpoints/fashion_mnist/victim_resnet18"
    assert find_input_path(shipped) == REPO_ROOT / shipped
    (tmp_path / shipped).mkdir(parents=True)  # a folder of that name here wins over the repository's
    assert find_input_path(shipped) == Path(shipped)
    assert find_input_path("google/ddpm-cifar10-32") == Path("google/ddpm-cifar10-32")
    assert find_input_path(tmp_path / "none") == tmp_path / "none"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_input_path("~/checkpoints") == tmp_path / "checkpoints"
    # attack.py's loaders follow it: from another directory the shipped victim and prior load by relative path, and
    # the victim folder made here (empty) is the one tried, so its error names it
    with pytest.raises(FileNotFoundError, match="victim_resnet18 lacks config.json"):
        attack.load_victim(attack.VictimSpec(checkpoint=shipped))
    (tmp_path / "mine").symlink_to(REPO_ROOT / shipped)  # '~' is expanded (it was not, for the victim)
    model, cfg = attack.load_victim(attack.VictimSpec(checkpoint="~/mine"))
    assert cfg["num_classes"] == 10 and model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)
    prior = attack.load_prior(attack.PriorSpec(path="checkpoints/fashion_mnist/ddpm_32"), (1, 32, 32))
    assert prior.unet.config.sample_size == 32
    # a missing './folder' stays a local path (Path() would drop the './' and make it look like a hub id)
    with pytest.raises(FileNotFoundError, match=r"prior './mine/ddpm' not found"):
        attack.load_prior(attack.PriorSpec(path="./mine/ddpm"), (1, 32, 32))


def test_run_directories_expand_home(tmp_path, monkeypatch):
    """'~' in output.root (quoted in a YAML file) made a literal './~' folder for results while Lightning's CSV
    logger expanded it: one run in two places; --resume '~/...' was 'not a run directory'."""
    import attack
    from inversion.fsutils import new_run_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run = new_run_dir("~/runs", "x")
    assert run.parent == tmp_path / "home" / "runs" and not (tmp_path / "~").exists()
    with pytest.raises(attack.ConfigError, match=f"--resume {tmp_path / 'home' / 'runs'}/x-.*no config.yaml"):
        attack.open_resume_dir(attack.build_parser(), attack.Namespace(resume=f"~/runs/{run.name}"))
