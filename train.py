"""Train the victim classifier, the evaluator or the DDPM prior with LightningCLI.

    python train.py --config configs/train/ddpm_fashion_mnist.yaml
    python train.py --config configs/train/victim_fashion_mnist.yaml
    python train.py --config configs/train/ddpm_fashion_mnist.yaml --ckpt_path last     # resume

A config pins one run: ``model`` (class_path/init_args), ``data``, ``trainer`` (with ``logger`` and
``callbacks``). Group files under configs/{data,model,trainer,logger} can be layered with several ``--config``.
W&B runs offline unless ``WANDB_MODE`` says otherwise. After fit, classifiers are tested on the test split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")

from lightning import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class ConfigMismatchError(ValueError):
    """Data and model disagree on image size, channels or classes."""


def check_data_model_agree(model: LightningModule, data: LightningDataModule) -> None:
    """Raise :class:`ConfigMismatchError` when model and data disagree on image_size, channels or num_classes."""
    hp = model.hparams
    pairs = [
        ("image_size", hp.get("image_size"), getattr(data, "image_size", None)),
        ("channels", hp.get("in_channels"), getattr(data, "channels", None)),
        ("num_classes", hp.get("num_classes"), getattr(data, "num_classes", None)),
    ]
    for name, m, d in pairs:
        if m is not None and d is not None and m != d:
            raise ConfigMismatchError(
                f"model and data disagree on {name}: model has {m}, data has {d}. Set "
                f"model.init_args.{'in_channels' if name == 'channels' else name} and "
                f"data.init_args.{name} to the same value in your config."
            )


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None, help="Lightning checkpoint to resume from, or 'last'.")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Run trainer.test after fit when the model has test_step.")


def main(args=None) -> None:
    """Command line entry point: build the model and data module from the config with LightningCLI (``args``: the
    argument list, None for ``sys.argv``; seed 0 unless ``seed_everything`` is set), fit, then run
    ``trainer.test`` when ``--test_after_fit`` (default true) and the model overrides ``test_step`` (the
    classifiers, not the DDPM). ``--ckpt_path`` resumes from a Lightning checkpoint file or 'last'.

    Raises:
        ConfigMismatchError (a ValueError): model and data disagree on image size, channels or classes.
        FileNotFoundError: ``--ckpt_path`` is neither 'last' nor an existing file.
        SystemExit: a bad command line (from the CLI's parser).
    """
    cli = TrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )
    check_data_model_agree(cli.model, cli.datamodule)
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path and ckpt_path != "last" and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist; pass a .ckpt file or 'last'")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if cli.config.get("test_after_fit") and type(cli.model).test_step is not LightningModule.test_step:
        cli.trainer.test(cli.model, datamodule=cli.datamodule)


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "train.py")
