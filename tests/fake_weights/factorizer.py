"""Builder of a fake official FACTORIZER weights folder (Lightning ``.ckpt`` files, random weights).

``make_fake_factorizer(root, widths=SMALL_WIDTHS)`` writes
``FACTORIZER/logs/isles2022_dwi-adc-flair/fold{0..4}/{resunet,swin-factorizer}/version_0/checkpoints/
epoch=1999-step=99999.ckpt`` under ``root``: Lightning-style dicts whose ``state_dict`` holds the
``net.``-prefixed parameters of the real architectures (at the given widths; the official widths
32..512 give ~116 MB / ~23 MB files, so tests use small widths), plus ``hyper_parameters`` that
pickle references to classes of a fake ``factorizer`` package and of ``pytorch_lightning``
(injected into ``sys.modules`` only while saving), an instance of a foreign dict subclass and real
``monai``/``torch.nn``/``torch.optim`` class references, so loading needs the restricted unpickler.

Returns ``{relpath: state_dict without 'net.'}`` so tests can build reference models directly.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import torch

SMALL_WIDTHS = (8, 8, 16, 16, 16)
ROOT = "FACTORIZER/logs/isles2022_dwi-adc-flair"
CKPT = "version_0/checkpoints/epoch=1999-step=99999.ckpt"


def relpath(fold: int, arch: str) -> str:
    return f"{ROOT}/fold{fold}/{arch}/{CKPT}"


@contextlib.contextmanager
def foreign_modules():
    """Temporarily install fake ``factorizer`` / ``pytorch_lightning`` modules with a few classes."""
    names = ["factorizer", "factorizer.factorizer", "factorizer.unet", "factorizer.utils",
             "factorizer.utils.lightning", "pytorch_lightning", "pytorch_lightning.utilities",
             "pytorch_lightning.utilities.parsing"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}

    def cls(module, name, bases=(object,)):
        c = type(name, bases, {"__module__": module})
        setattr(mods[module], name, c)
        return c

    cls("factorizer.factorizer", "SegmentationFactorizer")
    cls("factorizer.unet", "UNet")
    cls("factorizer.unet", "BasicBlock")
    cls("factorizer.factorizer", "FactorizerSubblock")
    cls("factorizer.utils.lightning", "SemanticSegmentation")
    cls("pytorch_lightning.utilities.parsing", "AttributeDict", (dict,))
    try:
        sys.modules.update(mods)
        yield mods
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def lightning_checkpoint(state_dict: dict, arch: str, mods: dict) -> dict:
    """A Lightning-1.6-style checkpoint dict around ``net.``-prefixed ``state_dict``."""
    import monai.losses

    attr = mods["pytorch_lightning.utilities.parsing"].AttributeDict
    if arch == "swin-factorizer":
        network = [mods["factorizer.factorizer"].SegmentationFactorizer,
                   {"in_channels": 3, "out_channels": 1, "spatial_size": [64, 64, 64], "dropout": 0.1,
                    "stem": [torch.nn.Conv3d, {"kernel_size": 3, "padding": 1, "bias": False}],
                    "nmf": [mods["factorizer.factorizer"].FactorizerSubblock, {"act": torch.nn.ReLU}]}]
    else:
        network = [mods["factorizer.unet"].UNet,
                   {"in_channels": 3, "out_channels": 1,
                    "block": [mods["factorizer.unet"].BasicBlock, {"norm": [torch.nn.GroupNorm, [8]]}]}]
    hp = attr(network=network, loss=[monai.losses.DiceCELoss, {"sigmoid": True}],
              optimizer=[torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.01}])
    first = next(iter(state_dict.values()))
    return {
        "epoch": 1999,
        "global_step": 100000,
        "pytorch-lightning_version": "1.6.5",
        "state_dict": {f"net.{k}": v for k, v in state_dict.items()},
        "loops": None,
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 50}":
                      {"best_model_score": None, "best_model_path": "", "dirpath": "logs/checkpoints"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(100000.0), "exp_avg": torch.zeros_like(first),
                                            "exp_avg_sq": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 1e-9, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0.01, "amsgrad": False, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 100000, "_step_count": 100001,
                           "lr_lambdas": [None]}],
        "hparams_name": "kwargs",
        "hyper_parameters": hp,
    }


def make_networks(widths=SMALL_WIDTHS, seed: int = 0):
    """``{relpath: module}`` for the 10 models (random init, seeded)."""
    from models.factorizer.resunet import ResUNet
    from models.factorizer.swin_factorizer import SwinFactorizer

    nets = {}
    for arch, cls in (("resunet", ResUNet), ("swin-factorizer", SwinFactorizer)):
        for fold in range(5):
            torch.manual_seed(seed * 100 + fold + (50 if arch != "resunet" else 0))
            net = cls(widths)
            with torch.no_grad():  # break the init symmetry of the norms so that every tensor matters
                for name, p in net.named_parameters():
                    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                        p.uniform_(0.5, 1.5)
                    elif name.endswith(("norm.bias", "norm1.bias", "norm2.bias")):
                        p.uniform_(-0.2, 0.2)
            nets[relpath(fold, arch)] = net
    return nets


def make_fake_factorizer(root, widths=SMALL_WIDTHS, seed: int = 0, folds=range(5)) -> dict:
    """Write the 10 fake checkpoints under ``root``; returns ``{relpath: state_dict}`` (no prefix)."""
    root = Path(root)
    out = {}
    nets = make_networks(widths, seed)
    with foreign_modules() as mods:
        for rel, net in nets.items():
            fold = int(rel.split("/fold")[1][0])
            if fold not in folds:
                continue
            arch = rel.split("/")[-4]
            sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(lightning_checkpoint(sd, arch, mods), path)
            out[rel] = sd
    return out
