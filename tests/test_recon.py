"""evaluate-recon: masked-voxel errors of a MAE/SimMIM against baselines that learn nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medmim.cli import main
from medmim.config import load_config
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.data.sampling import open_cache
from medmim.eval.recon import (
    fill_from_neighbours,
    masked_errors,
    neighbour_stats_prediction,
    reconstruction_report,
    trilinear_baseline,
    visible_mean_baseline,
)
from medmim.models import build_pretrainer, build_unetr, mask_to_image, random_masking
from medmim.models.transfer import save_weights
from tests.conftest import write_msd

FAST = ["train.log_every=1", "train.val_every=100", "train.preview_every=100", "train.ckpt_every=100",
        "data.num_workers=0"]
PATCH = (8, 8, 8)


def _mae(pred, x, vmask, inside=None) -> float:
    e = masked_errors(pred, x, vmask, inside)
    return float(e["abs"].sum() / e["count"].sum())


def _mse(pred, x, vmask, inside=None) -> float:
    e = masked_errors(pred, x, vmask, inside)
    return float(e["sq"].sum() / e["count"].sum())


# --- the baselines on volumes whose answer is known -------------------------------------------

def test_visible_mean_baseline_matches_a_hand_computed_error() -> None:
    # a 2x2x2 token grid: two visible patches at 0.2 and 0.4, six masked ones at 1.0
    token_mask = torch.ones(1, 8, dtype=torch.bool)
    token_mask[0, 0] = token_mask[0, 5] = False
    values = torch.where(token_mask, 1.0, 0.0).reshape(1, 1, 2, 2, 2)
    values[0, 0, 0, 0, 0], values[0, 0, 1, 0, 1] = 0.2, 0.4
    x = values.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)  # [1, 1, 16, 16, 16]
    vmask = mask_to_image(token_mask, (2, 2, 2), PATCH)
    pred = visible_mean_baseline(x, vmask)
    assert torch.allclose(pred, torch.full_like(x, 0.3))
    assert _mae(pred, x, vmask) == pytest.approx(0.7, abs=1e-6)
    assert _mse(pred, x, vmask) == pytest.approx(0.49, abs=1e-6)
    # voxels outside the scan (crop padding) neither feed the mean nor count as errors
    # (half of each visible patch and of two masked ones lies outside the scan, at 50)
    inside = torch.ones_like(vmask, dtype=torch.bool)
    inside[:, :, :, 4:8, :] = False
    x2 = torch.where(inside, x, torch.tensor(50.0))
    pred2 = visible_mean_baseline(x2, vmask, inside)
    assert torch.allclose(pred2, torch.full_like(x, 0.3))
    e = masked_errors(pred2, x2, vmask, inside)
    assert float(e["count"].sum()) == 6 * 512 - 2 * 256
    assert float(e["abs"].sum() / e["count"].sum()) == pytest.approx(0.7, abs=1e-6)


def test_fill_from_neighbours_reaches_every_cell() -> None:
    values = torch.zeros(1, 1, 5, 4, 3)
    values[0, 0, 0, 0, 0] = 7.0
    known = torch.zeros(1, 1, 5, 4, 3, dtype=torch.bool)
    known[0, 0, 0, 0, 0] = True
    assert torch.allclose(fill_from_neighbours(values, known), torch.full_like(values, 7.0))


def _ramp(size=32) -> torch.Tensor:
    d, h, w = torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij")
    return (0.01 * d + 0.02 * h - 0.015 * w + 0.3)[None, None]  # [1, 1, S, S, S]


def test_trilinear_baseline_is_exact_on_a_ramp_inside_the_grid() -> None:
    x = _ramp()
    token_mask = torch.zeros(1, 64, dtype=torch.bool)
    token_mask[0, 1 * 16 + 1 * 4 + 1] = True  # token (1, 1, 1): all 26 neighbours visible
    vmask = mask_to_image(token_mask, (4, 4, 4), PATCH)
    pred = trilinear_baseline(x, token_mask, PATCH)
    assert _mae(pred, x, vmask) < 1e-5  # a linear function: patch means at centres, symmetric fill, exact
    assert _mae(visible_mean_baseline(x, vmask), x, vmask) > 0.05


def test_trilinear_baseline_beats_the_visible_mean_on_a_smooth_ramp() -> None:
    x = _ramp()
    tm = random_masking(4, (4, 4, 4), mask_ratio=0.75, generator=torch.Generator().manual_seed(0)).mask
    x = x.expand(4, -1, -1, -1, -1)
    vmask = mask_to_image(tm, (4, 4, 4), PATCH)
    tri = _mae(trilinear_baseline(x, tm, PATCH), x, vmask)
    vm = _mae(visible_mean_baseline(x, vmask), x, vmask)
    assert tri < 0.5 * vm


def test_norm_pix_prediction_does_not_see_the_hidden_patch_statistics() -> None:
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    tm = torch.zeros(1, 8, dtype=torch.bool)
    tm[0, 3] = True
    shifted = x.clone()
    shifted[:, :, 0:8, 8:16, 8:16] = shifted[:, :, 0:8, 8:16, 8:16] * 3.0 + 5.0  # token 3, made brighter
    # a perfect norm-pix model reproduces each input patch exactly once its own stats are put back
    a = neighbour_stats_prediction(x, x, tm, PATCH)
    b = neighbour_stats_prediction(shifted, shifted, tm, PATCH)
    assert torch.allclose(a[:, :, 0:8, 8:16, 8:16], b[:, :, 0:8, 8:16, 8:16], atol=1e-4)
    assert torch.allclose(a[:, :, 8:, :, :], x[:, :, 8:, :, :], atol=1e-5)  # visible patches: as they were


@pytest.mark.parametrize("model_mse, says", [(0.5, "structure beyond local averages"), (0.8, "smooth fill-in"),
                                              (1.02, "averages only"), (2.0, "worse than predicting the mean")])
def test_the_verdict_names_what_the_model_beats(model_mse: float, says: str) -> None:
    from medmim.eval.recon import _verdict

    summary = {"model": {"mse": model_mse}, "visible_mean": {"mse": 1.0}, "trilinear": {"mse": 0.7}}
    assert says in _verdict(summary, "l2")


# --- the command on a pretrained tiny MAE ---------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(raw dataset, its cache, a 2-step mae-tiny run folder)."""
    tmp = tmp_path_factory.mktemp("recon")
    root = write_msd(tmp / "ds", n_labeled=4, n_unlabeled=2, shape=(40, 36, 24))
    cache = tmp / "cache"
    prepare_dataset(root, cache, PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    run = tmp / "run"
    assert main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=2"] + FAST) == 0
    return root, cache, run


def test_evaluate_recon_writes_a_table_of_the_model_and_both_baselines(pretrained, tmp_path: Path, capsys) -> None:
    _, cache, run = pretrained
    out = tmp_path / "recon"
    code = main(["evaluate-recon", "-c", str(run / "checkpoints" / "last.pt"), "-d", str(cache), "-o", str(out),
                 "--crops-per-case", "2"])
    std = capsys.readouterr()
    assert code == 0, std.err
    assert (out / "recon.md").is_file() and (out / "recon.csv").is_file() and (out / "recon.png").is_file()
    assert f"wrote {out / 'recon.md'}" in std.out and "visible mean" in std.out
    md = (out / "recon.md").read_text(encoding="utf-8")
    for label in ("| model |", "| baseline: mean of visible voxels |", "| baseline: trilinear from visible patches |"):
        assert label in md
    held_out = open_cache(cache).split(0)[1]
    assert held_out and all(c in md for c in held_out)
    rows = list(csv.DictReader(open(out / "recon.csv", encoding="utf-8")))
    assert {r["method"] for r in rows} == {"model", "visible_mean", "trilinear"}
    assert sorted({r["case"] for r in rows}) == sorted(held_out)
    assert all(int(r["crops"]) == 2 and int(r["masked_voxels"]) > 0 and float(r["mae"]) >= 0 for r in rows)
    # the same seed gives the same crops and masks: the run folder's safetensors, read directly, agrees
    res = reconstruction_report(run, [cache], tmp_path / "again", crops_per_case=2, log=lambda s: None)
    for method in ("model", "visible_mean", "trilinear"):
        first = next(r for r in rows if r["method"] == method and r["case"] == held_out[0])
        again = next(r for r in res["per_case"] if r["method"] == method and r["case"] == held_out[0])
        assert float(first["mae"]) == pytest.approx(again["mae"], rel=1e-4)
    assert res["methods"]["visible_mean"]["mae_ratio"] == pytest.approx(1.0)
    assert res["crops"] == 2 * len(held_out) and 0.7 < res["masked_token_fraction"] < 0.8


def test_norm_pix_model_on_a_raw_dataset_flags_the_leaky_row(pretrained, tmp_path: Path, monkeypatch) -> None:
    root, _, _ = pretrained
    monkeypatch.setenv("MEDMIM_CACHE", str(tmp_path / "cache-root"))  # the raw dataset is prepared here
    cfg = load_config("mae-tiny", ["pretrain.norm_pix_loss=true", "data.prepare_workers=1"])
    ckpt = save_weights(tmp_path / "np.safetensors", build_pretrainer(cfg), config=cfg)
    res = reconstruction_report(ckpt, [root], tmp_path / "out", crops_per_case=1, split="all", max_cases=2,
                                log=lambda s: None)
    assert list(res["methods"]) == ["model", "visible_mean", "trilinear", "model_own_patch_stats"]
    assert len(res["cases"]) == 2 and res["masked_voxels"] > 0  # 4 mm voxels: padded crops, padding not scored
    md = (tmp_path / "out" / "recon.md").read_text(encoding="utf-8")
    assert "leaks the target" in md and "norm-pix" in md


@pytest.mark.parametrize("kind", ["simclr", "finetune", "none"])
def test_a_checkpoint_without_a_reconstruction_head_exits_2(kind: str, pretrained, tmp_path: Path, capsys) -> None:
    _, cache, _ = pretrained
    path = tmp_path / f"{kind}.safetensors"
    if kind == "simclr":
        cfg = load_config("simclr-tiny")
        save_weights(path, build_pretrainer(cfg), config=cfg)
    elif kind == "finetune":
        cfg = load_config("unetr-tiny")
        save_weights(path, build_unetr(cfg.model), config=cfg)
    else:
        path = tmp_path / "missing.pt"
    code = main(["evaluate-recon", "-c", str(path), "-d", str(cache), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err
    expect = {"simclr": "SimCLR checkpoint has no reconstruction head", "finetune": "fine-tuning (UNETR) checkpoint",
              "none": "checkpoint not found"}[kind]
    assert expect in err
    if kind != "none":
        assert "needs a MAE or SimMIM pretraining checkpoint" in err
    assert not (tmp_path / "out").exists()
