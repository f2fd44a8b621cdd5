"""The Swin backbone through the product: config refusals, the stage-wise recipe, and a tiny study that pretrains
SimMIM on the Swin transformer, fine-tunes Swin UNETR from it, predicts, exports to MONAI and scores the
reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmim.cli import main
from medmim.config import load_config
from medmim.data.io import read_image
from medmim.errors import MedmimError
from tests.conftest import run_study

SWIN_TINY = ["model.backbone=swin", "model.feature_size=12", "model.swin.depths=[1,1,1,1]",
             "model.swin.num_heads=[1,1,1,1]", "model.swin.window_size=4", "data.roi_size=64", "model.img_size=64"]


@pytest.mark.parametrize("method, why", [
    ("mae", "MAE's encoder sees only the visible tokens, which a windowed transformer cannot"),
    ("simclr", "contrastive pretraining is built for the ViT only"),
])
def test_methods_that_do_not_fit_a_swin_are_refused_saying_why(method: str, why: str) -> None:
    with pytest.raises(MedmimError, match=f"pretrain.method={method} does not work with model.backbone=swin.*{why}"):
        load_config("simmim-swin-cpu", [f"pretrain.method={method}"])
    # the same settings fine-tune: the method only matters for pretraining
    assert load_config("swin-unetr-cpu", [f"pretrain.method={method}"]).model.backbone == "swin"


def test_swin_sizes_and_heads_it_cannot_take_are_refused() -> None:
    with pytest.raises(MedmimError, match=r"Swin UNETR needs at least two voxels at its last stage, i.e. \[64, 64, 64\]"):
        load_config("swin-unetr-cpu", ["model.img_size=32", "data.roi_size=32"])
    with pytest.raises(MedmimError, match="model.head=probe is built for the ViT only"):
        load_config("swin-unetr-cpu", ["model.head=probe"])
    with pytest.raises(MedmimError, match="four stages"):
        load_config("swin-unetr-cpu", ["model.swin.depths=[2,2,2]", "model.swin.num_heads=[1,2,4]"])
    with pytest.raises(MedmimError, match=r"mask_patch_size \[3, 3, 3\] must be a multiple of model.swin.patch_size"):
        load_config("simmim-swin-cpu", ["pretrain.simmim.mask_patch_size=3"])


def test_layer_decay_runs_over_the_swin_stages_and_freezing_holds_the_swin_still() -> None:
    from medmim.data.selection import RunCases
    from medmim.train.tasks import task_for

    cfg = load_config("swin-unetr-cpu", SWIN_TINY + ["train.layer_decay=0.5", "train.freeze_encoder_steps=10"])
    task = task_for(cfg, RunCases([], [], {0: "background", 1: "liver"}, [], 1), torch.device("cpu"))
    scale = task.lr_scale()
    assert scale("swinViT.patch_embed.proj.weight") == (0.5 ** 5, True)
    assert scale("swinViT.layers1.0.blocks.0.attn.qkv.weight") == (0.5 ** 4, True)
    assert scale("swinViT.layers4.0.downsample.reduction.weight") == (0.5, True)
    assert scale("decoder1.transp_conv.conv.weight") == (1.0, False)
    assert scale("out.conv.conv.weight") == (1.0, False)


TINY_SWIN_STUDY = """
name: tiny-swin
data:
  phantom: {labeled: 5, unlabeled: 2, seed: 3, shape: [64, 56, 40], spacing: [6.0, 6.0, 6.0]}
pretrain:
  config: simmim-swin-cpu
  overrides: ["data.spacing=[6.0,6.0,6.0]", train.max_steps=2, train.val_every=2, train.preview_every=2,
              data.num_workers=0, data.prepare_workers=1, data.batch_size=1, OVERRIDES]
finetune:
  config: swin-unetr-cpu
  overrides: ["data.spacing=[6.0,6.0,6.0]", train.max_steps=2, train.val_every=1, train.preview_every=2,
              data.num_workers=0, data.prepare_workers=1, data.batch_size=1, OVERRIDES]
seeds: [0]
axes:
  - name: method
    values:
      - {label: scratch, pretrain: null}
      - {label: simmim-swin, pretrain: [pretrain.method=simmim]}
baseline: {method: scratch}
""".replace("OVERRIDES", ", ".join(f'"{o}"' for o in SWIN_TINY))


def test_a_tiny_swin_study_pretrains_simmim_transfers_whole_and_exports_to_monai(tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    from monai.networks.nets import SwinUNETR

    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    out, log, res = run_study(TINY_SWIN_STUDY, tmp_path, capsys)
    assert "pretrain (simmim on the Swin transformer)" in log and "finetune (Swin UNETR)" in log
    assert "all " in log.split("encoder from ")[1].splitlines()[0]  # the whole pretrained Swin came over
    assert {c["values"]["method"] for c in res["cells"]} == {"scratch", "simmim-swin"}
    assert all(c["evaluation"]["cases"] >= 1 for c in res["cells"])
    pre = next((out / "pretrain").iterdir())
    # evaluate-recon scores the Swin SimMIM as it does the ViT's
    assert main(["evaluate-recon", "-c", str(pre), "-d", str(out / "cache" / "prepared"), "-o", str(tmp_path / "recon"),
                 "--crops-per-case", "1", "--max-cases", "1"]) == 0
    assert "trilinear" in (tmp_path / "recon" / "recon.md").read_text(encoding="utf-8")
    # export: strict into MONAI's SwinUNETR.swinViT, and through its own load_from
    monai = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      window_size=4, patch_size=2)
    assert main(["export", "-c", str(pre / "model.safetensors"), "--format", "monai", "-o", str(tmp_path / "swin.pt")]) == 0
    assert "SwinUNETR(in_channels=1" in capsys.readouterr().out
    monai.swinViT.load_state_dict(torch.load(tmp_path / "swin.pt", weights_only=True), strict=True)
    assert main(["export", "-c", str(pre / "model.safetensors"), "--format", "model_swinvit",
                 "-o", str(tmp_path / "model_swinvit.pt")]) == 0
    monai.load_from(torch.load(tmp_path / "model_swinvit.pt", weights_only=True))
    from medmim.models.transfer import read_checkpoint

    mine = read_checkpoint(pre / "model.safetensors").state
    for k, v in monai.swinViT.state_dict().items():
        torch.testing.assert_close(v, mine[f"encoder.{k}"])
    # a fine-tuned Swin UNETR predicts a label map on the scan's own grid
    ckpt = out / "cells" / "method-simmim-swin_seed0" / "run" / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        ckpt = next((out / "cells" / "method-simmim-swin_seed0").rglob("last.pt"))
    case = out / "phantom" / "imagesTr" / "case_0000.nii.gz"
    if not case.is_file():
        case = next((out / "phantom" / "imagesTr").iterdir())
    assert main(["predict", "-c", str(ckpt), "-o", str(tmp_path / "pred"), str(case)]) == 0
    pred, src = read_image(next((tmp_path / "pred").iterdir())), read_image(case)
    assert pred.array.shape == src.array.shape and np.abs(pred.affine - src.affine).max() < 1e-4
    # the ViT's diagnostics refuse a Swin UNETR, saying so
    from medmim.eval.evaluate import evaluate

    with pytest.raises(MedmimError, match="a Swin UNETR; --vit-reliance and --vit-features are for UNETR's ViT"):
        evaluate(out / "phantom", tmp_path / "ev", checkpoint=str(ckpt), vit_reliance=True)
