"""The frozen-encoder probe (model.head=probe): a linear head on a frozen ViT's upsampled tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medmim.cli import main
from medmim.config import load_config
from medmim.data.prepare import PrepareSettings, prepare_dataset
from medmim.eval.inference import Predictor
from medmim.models import LinearProbe, build_segmenter
from medmim.models.transfer import read_checkpoint
from tests.conftest import write_msd

FAST = ["train.log_every=1", "train.val_every=2", "train.preview_every=2", "train.ckpt_every=2", "data.num_workers=0"]


def _probe() -> LinearProbe:
    torch.manual_seed(0)
    model = build_segmenter(load_config("unetr-tiny", ["model.head=probe", "model.num_classes=3"]).model)
    assert isinstance(model, LinearProbe)
    return model


def test_probe_is_a_linear_head_on_the_upsampled_tokens():
    """Its logits equal a linear layer applied to the trilinearly upsampled tokens of the frozen ViT."""
    model = _probe().eval()
    x = torch.rand(2, 1, *model.vit.img_size, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (2, 3, *x.shape[2:])
    grid = [s // p for s, p in zip(x.shape[2:], model.vit.patch_size)]
    z = model.vit(x)
    feats = F.interpolate(z.transpose(1, 2).reshape(2, -1, *grid), size=x.shape[2:], mode="trilinear")
    by_hand = torch.einsum("ncdhw,kc->nkdhw", feats, model.head.weight) + model.head.bias[:, None, None, None]
    torch.testing.assert_close(logits, by_hand, rtol=1e-4, atol=1e-5)


def test_only_the_head_trains_and_the_encoder_stays_in_eval_mode():
    model = _probe().train()
    assert not model.vit.training and model.head.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    x = torch.rand(2, 1, *model.vit.img_size)
    model(x).square().mean().backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.vit.parameters())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("probe")
    root = write_msd(tmp / "ds", n_labeled=6, n_unlabeled=3, shape=(40, 36, 24))
    prepare_dataset(root, tmp / "cache", PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    return tmp / "cache"


def test_a_probe_run_keeps_the_pretrained_encoder_and_predicts(cache: Path, tmp_path: Path, capsys) -> None:
    """Fine-tuning with model.head=probe from an MAE run: the saved encoder is the pretrained one, bit for bit,
    beside the head, and the run's model rebuilds for prediction from its checkpoint alone."""
    assert main(["pretrain", "mae-tiny", f"data.path={cache}", f"run.dir={tmp_path / 'pre'}",
                 "train.max_steps=2"] + FAST) == 0
    pre = read_checkpoint(tmp_path / "pre" / "model.safetensors").state
    encoder = {k.removeprefix("encoder."): v for k, v in pre.items() if k.startswith("encoder.")}
    run = tmp_path / "probe"
    code = main(["finetune", "unetr-tiny", f"data.path={cache}", f"run.dir={run}", "train.max_steps=4",
                 "model.head=probe", f"model.pretrained={tmp_path / 'pre' / 'model.safetensors'}"] + FAST)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "linear probe" in err
    tuned = read_checkpoint(run / "model.safetensors").state
    vit = {k.removeprefix("vit."): v for k, v in tuned.items() if k.startswith("vit.")}
    assert vit.keys() == encoder.keys()
    for name, w in encoder.items():
        torch.testing.assert_close(vit[name], w, rtol=0, atol=0, msg=name)
    assert set(tuned) - {f"vit.{k}" for k in vit} == {"head.weight", "head.bias"}
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "last.pt")
    assert isinstance(predictor.model, LinearProbe)
