"""predict / evaluate / export: original geometry, honest metrics, MONAI interop from the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmim.cli import main
from medmim.config import load_config
from medmim.data.io import read_image, write_nifti
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.errors import MedmimError
from medmim.eval.evaluate import evaluate
from medmim.eval.inference import PredictOptions, Predictor, largest_component_per_class
from medmim.eval.metrics import score_case
from tests.conftest import write_msd


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


FAST = ["train.log_every=1", "train.val_every=100", "train.preview_every=100", "train.ckpt_every=100",
        "data.num_workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset (one case stored LPS at 0.9x0.9x2.5 mm) and a UNETR fine-tuned on it for 2 steps."""
    tmp = tmp_path_factory.mktemp("eval")
    root = write_msd(tmp / "ds", n_labeled=4, n_unlabeled=1, shape=(40, 36, 24))
    aff = np.diag([-0.9, -0.9, 2.5, 1.0])
    aff[:3, 3] = [30.0, 20.0, -10.0]
    img = np.full((50, 44, 14), -1000, np.int16)
    img[5:45, 4:40, 1:13] = 40
    write_nifti(root / "imagesTs" / "case_004.nii.gz", img, aff)
    cache = tmp / "cache"
    prepare_dataset(root, cache, PrepareSettings(spacing=(4.0, 4.0, 6.0)))
    run = tmp / "run"
    assert main(["finetune", "unetr-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=2"] + FAST) == 0
    return root, run


def test_predict_writes_labels_in_the_original_geometry(trained, tmp_path: Path, capsys) -> None:
    root, run = trained
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    code = main(["predict", "-c", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "pred"),
                 str(root / "imagesTs" / "case_004.nii.gz"), str(junk), "--tta", "--lcc"])
    err = capsys.readouterr().err
    assert code == 2 and "1 case(s) failed: junk" in err  # the one-line error names the case
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["case_004.nii.gz"]  # the rest went on
    pred = read_image(tmp_path / "pred" / "case_004.nii.gz")
    src = read_image(root / "imagesTs" / "case_004.nii.gz")
    assert pred.shape == src.shape == (50, 44, 14)
    np.testing.assert_allclose(pred.affine, src.affine)
    assert pred.array.dtype == np.uint8 and pred.array.max() < 14


def test_evaluate_a_checkpoint_writes_csv_markdown_and_overlays(trained, tmp_path: Path, capsys) -> None:
    root, run = trained
    code = main(["evaluate", "-c", str(run / "checkpoints" / "last.pt"), "--data", str(root), "--out", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    rows = _csv_rows(tmp_path / "ev" / "metrics.csv")
    val = {r["case"] for r in rows}
    assert len(val) == 1 and {r["name"] for r in rows} == {"spleen", "right kidney", "left kidney"}
    assert (tmp_path / "ev" / "metrics.md").read_text(encoding="utf-8").startswith("# Evaluation of")
    assert list((tmp_path / "ev").glob("overlay_*.png"))
    assert all((tmp_path / "ev" / "predictions" / f"{c}.nii.gz").is_file() for c in val)


def test_metrics_are_honest(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=3, n_unlabeled=0, shape=(20, 18, 16))
    preds = tmp_path / "preds"
    for i in range(3):
        gt = read_image(root / "labelsTr" / f"case_{i:03d}.nii.gz")
        write_nifti(preds / f"case_{i:03d}.nii.gz", gt.array, gt.affine)
    assert main(["evaluate", "--predictions", str(preds), "--data", str(root), "--split", "all", "--out",
                 str(tmp_path / "ev")]) == 0
    rows = _csv_rows(tmp_path / "ev" / "metrics.csv")
    assert len(rows) == 3 * 3 and {r["status"] for r in rows} == {"ok"}  # 3 cases x 3 organs, all scored
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    ev = evaluate(root, tmp_path / "ev2", predictions=str(preds), split="all", log=lambda s: None)
    assert ev.mean_dice() == 1.0 and ev.mean_hd95() == 0.0  # the means the command prints and metrics.md shows
    # HD95 in millimetres with the true spacing: a shift of 2 slices of 2.5 mm is 5 mm
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[5:15, 5:15, 5:15] = 1
    shifted = np.roll(gt, 2, axis=2)
    s = score_case("c", shifted, gt, (0.8, 0.8, 2.5), {0: "bg", 1: "liver", 2: "spleen"})
    assert s[0].hd95_mm == pytest.approx(5.0) and 0 < s[0].dice < 1
    assert s[1].status == "absent" and s[1].dice is None  # empty in both: not a 0, not a 1
    missed = score_case("c", np.zeros_like(gt), gt, (1, 1, 1), {1: "liver"})[0]
    assert missed.status == "missed" and missed.dice == 0.0 and missed.hd95_mm is None


def test_evaluate_table_matches_a_hand_computed_dice(tmp_path: Path) -> None:
    """spleen: a 10^3 cube against the same cube 2 slices further: 800 shared voxels, Dice 2*800/2000 = 0.8;
    right kidney: exact, 1.0; left kidney: in neither, reported absent and left out of the mean (0.9)."""
    root = write_msd(tmp_path / "ds", n_labeled=1, n_unlabeled=0, shape=(20, 20, 20))
    gt_img = read_image(root / "labelsTr" / "case_000.nii.gz")
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[2:12, 2:12, 2:12] = 1
    gt[14:18, 14:18, 14:18] = 2
    pred = gt.copy()
    pred[pred == 1] = 0
    pred[2:12, 2:12, 4:14] = 1
    write_nifti(root / "labelsTr" / "case_000.nii.gz", gt, gt_img.affine)
    write_nifti(tmp_path / "preds" / "case_000.nii.gz", pred, gt_img.affine)
    assert main(["evaluate", "--predictions", str(tmp_path / "preds"), "--data", str(root), "--split", "all",
                 "--out", str(tmp_path / "ev")]) == 0
    rows = {r["name"]: r for r in _csv_rows(tmp_path / "ev" / "metrics.csv")}
    assert float(rows["spleen"]["dice"]) == pytest.approx(0.8)
    assert float(rows["right kidney"]["dice"]) == pytest.approx(1.0)
    assert rows["left kidney"]["dice"] == "" and rows["left kidney"]["status"] == "absent"
    table = (tmp_path / "ev" / "metrics.md").read_text(encoding="utf-8")
    assert "0.800" in table and "absent" in table
    ev = evaluate(root, tmp_path / "ev2", predictions=str(tmp_path / "preds"), split="all", log=lambda s: None)
    assert ev.mean_dice() == pytest.approx(0.9)  # (0.8 + 1.0) / 2: the absent class is left out of the mean


def test_largest_component_keeps_each_organs_main_body() -> None:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:10, 2:10, 2:10] = 6
    lab[15:17, 15:17, 15:17] = 6  # a stray blob
    lab[12:14, 2:4, 2:4] = 1
    out = largest_component_per_class(lab)
    assert (out[15:17, 15:17, 15:17] == 0).all() and (out[2:10, 2:10, 2:10] == 6).all() and (out == 1).sum() == 8


class _RightIsTwo(torch.nn.Module):
    """A 'network' that learned laterality from position: the array's high-x half (the patient's right,
    RAS) is class 2 (right kidney), the low-x half class 3 (left kidney), whatever it sees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, X, Y, Z = x.shape
        logits = torch.zeros(n, 4, X, Y, Z)
        right = (torch.arange(X) >= X // 2).float()[:, None, None].expand(X, Y, Z)
        logits[:, 2] = 5 * right
        logits[:, 3] = 5 * (1 - right)
        return logits


def test_mirrored_test_time_augmentation_swaps_left_and_right_back() -> None:
    cfg = load_config("unetr-tiny", ["task=finetune"])
    image = np.random.default_rng(0).random((1, 32, 32, 32), dtype=np.float32)
    for pairs, expect_right in (([(2, 3)], 2), ([], None)):
        p = Predictor(_RightIsTwo(), cfg, PredictOptions(tta=True, sw_batch_size=1), lateral_pairs=pairs)
        probs = p.probabilities(image)
        if expect_right:
            assert (probs.argmax(0)[20:] == 2).all() and (probs.argmax(0)[:12] == 3).all()
        else:  # without declared pairs the mirrored votes fight: no confident 'right kidney'
            assert float(probs[2, 20:].mean()) < 0.9


def test_export_to_monai_from_the_command_line(trained, tmp_path: Path, capsys) -> None:
    from monai.networks.nets import UNETR as MonaiUNETR
    from monai.networks.nets import ViT

    from medmim.models import build_unetr
    from medmim.models.transfer import read_checkpoint

    _, run = trained
    ckpt = run / "checkpoints" / "last.pt"
    assert main(["export", "-c", str(ckpt), "--format", "monai", "-o", str(tmp_path / "vit.pt")]) == 0
    assert "proj_type='conv'" in capsys.readouterr().out
    state = torch.load(tmp_path / "vit.pt", weights_only=True)
    kw = dict(in_channels=1, img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, num_layers=4,
              num_heads=4, proj_type="conv", classification=False, qkv_bias=True)
    vit = ViT(pos_embed_type="sincos", **kw)
    vit.load_state_dict(state, strict=True)
    MonaiUNETR(in_channels=1, out_channels=14, img_size=(32, 32, 32), feature_size=16, hidden_size=48, mlp_dim=96,
               num_heads=4).vit  # noqa: B018 - constructing shows the same settings are valid for UNETR
    ours = build_unetr(load_config("unetr-tiny").model)
    ours.load_state_dict(read_checkpoint(ckpt).state)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x)[0], ours.vit(x), rtol=1e-4, atol=1e-5)
    assert main(["export", "-c", str(ckpt), "--format", "safetensors", "-o", str(tmp_path / "w.safetensors")]) == 0
    assert read_checkpoint(tmp_path / "w.safetensors").config["task"] == "finetune"


def test_vit_features_averaged_feeds_the_decoder_token_means_and_leaves_no_trace() -> None:
    from medmim.models import build_unetr
    from medmim.models.unetr import vit_features_averaged

    torch.manual_seed(0)
    model = build_unetr(load_config("unetr-tiny").model).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    mean = lambda t: t.mean(dim=1, keepdim=True).expand_as(t)
    with torch.no_grad():
        before = model(x)
        # by hand: UNETR's forward with the ViT's final tokens and skips replaced by their mean over tokens
        z, hidden = model.vit(x, return_hidden=True)
        grid = [s // p for s, p in zip(x.shape[2:], model.vit.patch_size)]
        a, b, c = model.skip_layers
        enc = [model.encoder2(model.proj_feat(mean(hidden[a]), grid)),
               model.encoder3(model.proj_feat(mean(hidden[b]), grid)),
               model.encoder4(model.proj_feat(mean(hidden[c]), grid))]
        dec = model.decoder5(model.proj_feat(mean(z), grid), enc[2])
        dec = model.decoder2(model.decoder3(model.decoder4(dec, enc[1]), enc[0]), model.encoder1(x))
        by_hand = model.out(dec)
        seen = []
        with vit_features_averaged(model):
            probe = model.vit.register_forward_hook(lambda m, i, o: seen.append(o))  # runs after the averaging
            averaged = model(x)
            probe.remove()
        after = model(x)
    (z_seen, hidden_seen), = seen
    for t in [z_seen, *hidden_seen]:  # what the decoder got: one vector per sample, the same at every token
        assert t.shape == z.shape and torch.equal(t, t[:, :1].expand_as(t))
    torch.testing.assert_close(z_seen[:, 0], z.mean(1))
    assert not torch.allclose(averaged, before, atol=1e-4)  # the ViT's spatial information mattered
    torch.testing.assert_close(averaged, by_hand)
    assert torch.equal(after, before) and not model.vit._forward_hooks  # no trace once the context exits
    with pytest.raises(RuntimeError, match="boom"), vit_features_averaged(model):
        raise RuntimeError("boom")
    assert not model.vit._forward_hooks  # removed on an exception too
    with pytest.raises(MedmimError, match="vit"), vit_features_averaged(torch.nn.Linear(2, 2)):
        pass


def test_vit_reliance_scores_the_averaged_predictions_beside_the_real_ones(trained, tmp_path: Path, capsys) -> None:
    root, run = trained
    ckpt = str(run / "checkpoints" / "last.pt")
    quiet = dict(n_overlays=0, log=lambda s: None)
    plain = evaluate(root, tmp_path / "plain", checkpoint=ckpt, **quiet)
    averaged = evaluate(root, tmp_path / "mean", checkpoint=ckpt, vit_features="mean", **quiet)
    assert "the ViT's features averaged" in (tmp_path / "mean" / "metrics.md").read_text(encoding="utf-8")
    code = main(["evaluate", "-c", ckpt, "--data", str(root), "--out", str(tmp_path / "rel"), "--vit-reliance"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rel = json.loads((tmp_path / "rel" / "reliance.json").read_text(encoding="utf-8"))
    assert rel["mean_dice"] == plain.mean_dice() is not None  # the as-is evaluation, unchanged
    assert rel["mean_dice_vit_averaged"] == averaged.mean_dice()  # the same as --vit-features mean
    assert rel["drop"] == rel["mean_dice"] - rel["mean_dice_vit_averaged"]
    assert rel["per_class_vit_averaged"] == {str(c): d["mean_dice"] for c, d in averaged.per_class().items()}
    assert f"drop {rel['drop']:.4f}" in printed.out  # the command's summary line
    md = (tmp_path / "rel" / "metrics.md").read_text(encoding="utf-8")
    assert md.startswith("# Evaluation of") and "ViT reliance: held-out mean Dice" in md
    assert f"the ViT carries {rel['drop']:.4f} of it" in md
    assert (tmp_path / "rel" / "metrics.csv").read_text(encoding="utf-8") == \
        (tmp_path / "plain" / "metrics.csv").read_text(encoding="utf-8")  # scores the as-is predictions only
    names = sorted(p.name for p in (tmp_path / "plain" / "predictions").iterdir())
    assert names and sorted(p.name for p in (tmp_path / "rel" / "predictions").iterdir()) == names
    for name in names:  # the real predictions, not the averaged ones
        np.testing.assert_array_equal(read_image(tmp_path / "rel" / "predictions" / name).array,
                                      read_image(tmp_path / "plain" / "predictions" / name).array)


def test_vit_options_need_a_checkpoint(tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=1, n_unlabeled=0, shape=(20, 18, 16))
    (tmp_path / "preds").mkdir()
    for flags in (["--vit-reliance"], ["--vit-features", "mean"]):
        code = main(["evaluate", "--predictions", str(tmp_path / "preds"), "--data", str(root), "--out",
                     str(tmp_path / "ev")] + flags)
        err = capsys.readouterr().err
        assert code == 2 and flags[0] in err and "--checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()  # refused before anything was written
    with pytest.raises(MedmimError, match="--vit-features"):
        evaluate(root, tmp_path / "ev", predictions=str(tmp_path / "preds"), vit_features="median")
