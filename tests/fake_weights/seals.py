"""Build a fake official SEALS folder: a small random Generic_UNet in the exact nnU-Net v1 file layout.

``make_fake_seals(weights_dir)`` writes

    SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/
      nnUNetTrainerV2_DDP__nnUNetPlansv2.1/{plans.pkl, fold_0..4/model_final_checkpoint.model(+.pkl)}

with the dict keys of ``shared/docs/official-weights-formats.md`` section 2: ``.model`` is a
``torch.save`` dict (``epoch``, ``state_dict``, ``optimizer_state_dict``, ``lr_scheduler_state_dict``,
``plot_stuff``, ``best_stuff``, ``amp_grad_scaler``; numpy floats inside, as nnU-Net writes them),
``.model.pkl`` a plain pickle (``init`` 9-tuple, ``name``, ``class``, ``plans``) and ``plans.pkl``
the plans dict (numpy arrays, OrderedDicts). Keys carry the DDP ``module.`` prefix unless
``module_prefix=False``. Fold k's weights come from ``seed + k``.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

ROOT = ("SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/"
        "nnUNetTrainerV2_DDP__nnUNetPlansv2.1")


def fake_plans(base_features: int = 4, num_pool: int = 3, patch=(32, 32, 32), use_mask_for_norm=(True, True),
               transpose_forward=(0, 1, 2), conv_kernels=None, pool_kernels=None) -> dict:
    """An nnU-Net v1 plans dict (ExperimentPlanner3D_v21 layout) for a small 1 mm network."""
    tf = list(transpose_forward)
    tb = [tf.index(i) for i in range(3)]
    pools = pool_kernels or [[2, 2, 2]] * num_pool
    convs = conv_kernels or [[3, 3, 3]] * (len(pools) + 1)
    stage = {
        "batch_size": 2,
        "num_pool_per_axis": [len(pools)] * 3,
        "patch_size": np.array(patch, dtype=np.int64),
        "median_patient_size_in_voxels": np.array([138, 171, 133], dtype=np.int64),
        "current_spacing": np.array([1.0, 1.0, 1.0]),
        "original_spacing": np.array([1.0, 1.0, 1.0]),
        "do_dummy_2D_data_aug": False,
        "pool_op_kernel_sizes": [list(k) for k in pools],
        "conv_kernel_sizes": [list(k) for k in convs],
    }
    intensity = OrderedDict((c, OrderedDict(median=np.float64(100.0), mean=np.float64(110.0), sd=np.float64(30.0),
                                            mn=np.float64(0.0), mx=np.float64(900.0),
                                            percentile_99_5=np.float64(800.0), percentile_00_5=np.float64(1.0)))
                            for c in range(2))
    return {
        "num_stages": 1,
        "num_modalities": 2,
        "modalities": {0: "DWI", 1: "ADC"},
        "normalization_schemes": OrderedDict([(0, "nonCT"), (1, "nonCT")]),
        "use_mask_for_norm": OrderedDict([(0, bool(use_mask_for_norm[0])), (1, bool(use_mask_for_norm[1]))]),
        "base_num_features": int(base_features),
        "num_classes": 1,
        "all_classes": [1],
        "transpose_forward": tf,
        "transpose_backward": tb,
        "conv_per_stage": 2,
        "dataset_properties": {"intensityproperties": intensity,
                               "modalities": {0: "DWI", 1: "ADC"},
                               "all_classes": [1],
                               "size_reductions": OrderedDict(case_0000=np.float64(0.7))},
        "keep_only_largest_region": None,
        "min_region_size_per_class": None,
        "min_size_per_class": None,
        "data_identifier": "nnUNetData_plans_v2.1",
        "preprocessor_name": "GenericPreprocessor",
        "plans_per_stage": {0: stage},
        "original_spacings": [np.array([1.0, 1.0, 1.0])],
        "original_sizes": [np.array([138, 171, 133])],
    }


def random_state_dict(plans: dict, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Random weights for the plan's Generic_UNet, scaled so that activations stay O(1)."""
    from models.seals.network import build_network
    from models.seals.plans import plan_from_dict

    torch.manual_seed(seed)
    net = build_network(plan_from_dict(plans))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "instnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif p.dim() > 1:
                fan_in = p.shape[1] * int(np.prod(p.shape[2:]))
                p.copy_(torch.randn_like(p) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return OrderedDict((k, v.clone()) for k, v in net.state_dict().items())


def make_fake_seals(weights_dir, *, base_features: int = 4, num_pool: int = 3, patch=(32, 32, 32),
                    module_prefix: bool = True, seed: int = 0, use_mask_for_norm=(True, True),
                    transpose_forward=(0, 1, 2), plans: dict | None = None, folds=range(5)) -> dict:
    """Write the fake folder under ``weights_dir``; returns {"root", "plans", "state_dicts"}."""
    weights_dir = Path(weights_dir)
    plans = plans or fake_plans(base_features, num_pool, patch, use_mask_for_norm, transpose_forward)
    root = weights_dir / ROOT
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "plans.pkl", "wb") as fh:
        pickle.dump(plans, fh)
    state_dicts = {}
    for k in folds:
        sd = random_state_dict(plans, seed + k)
        state_dicts[k] = sd
        saved = OrderedDict((("module." + n) if module_prefix else n, v) for n, v in sd.items())
        ckpt = {
            "epoch": 1000,
            "state_dict": saved,
            "optimizer_state_dict": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                     "param_groups": [{"lr": 1e-5, "momentum": 0.99, "dampening": 0,
                                                       "weight_decay": 3e-5, "nesterov": True, "params": [0]}]},
            "lr_scheduler_state_dict": None,
            "plot_stuff": ([1.0, 0.9], [1.1, 0.95], [np.float64(0.5), np.float64(0.6)], [0.4, 0.5]),
            "best_stuff": (999, np.float64(0.61), np.float64(0.62)),
            "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 10},
        }
        fold_dir = root / f"fold_{k}"
        fold_dir.mkdir(exist_ok=True)
        torch.save(ckpt, fold_dir / "model_final_checkpoint.model")
        info = {
            "init": (str(root / "plans.pkl"), k, str(fold_dir), "/data/nnUNet_preprocessed/Task012",
                     True, 0, True, False, True),
            "name": "nnUNetTrainerV2",
            "class": "<class 'nnunet.training.network_training.nnUNetTrainerV2.nnUNetTrainerV2'>",
            "plans": plans,
        }
        with open(fold_dir / "model_final_checkpoint.model.pkl", "wb") as fh:
            pickle.dump(info, fh)
    return {"root": root, "plans": plans, "state_dicts": state_dicts}
