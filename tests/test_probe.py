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
from medmim.models.rebuild import config_of, model_from
from medmim.models.transfer import Checkpoint, read_checkpoint
from tests.conftest import write_msd

FAST = ["train.log_every=1", "train.val_every=2", "train.preview_every=2", "train.ckpt_every=2", "data.num_workers=0"]


def _probe(*overrides: str) -> LinearProbe:
    torch.manual_seed(0)
    model = build_segmenter(load_config("unetr-tiny", ["model.head=probe", "model.num_classes=3", *overrides]).model)
    assert isinstance(model, LinearProbe)
    return model


def _by_hand(model: LinearProbe, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The head applied to the tokens ``z`` upsampled trilinearly to ``x``'s size."""
    grid = [s // p for s, p in zip(x.shape[2:], model.vit.patch_size)]
    feats = F.interpolate(z.transpose(1, 2).reshape(len(x), -1, *grid), size=x.shape[2:], mode="trilinear")
    return torch.einsum("ncdhw,kc->nkdhw", feats, model.head.weight) + model.head.bias[:, None, None, None]


def test_probe_is_a_linear_head_on_the_upsampled_tokens():
    """Raw tokens (model.probe_norm=none): its logits equal a linear layer applied to the trilinearly upsampled
    tokens of the frozen ViT."""
    model = _probe("model.probe_norm=none").eval()
    x = torch.rand(2, 1, *model.vit.img_size, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (2, 3, *x.shape[2:])
    torch.testing.assert_close(logits, _by_hand(model, x, model.vit(x)), rtol=1e-4, atol=1e-5)


def test_the_default_probe_standardises_each_token_channel_and_stays_linear_in_evaluation():
    """Training mode: each channel is standardised over all tokens of the batch, and the running statistics
    follow. Evaluation: a fixed affine map of the tokens by those statistics, then the head: still linear."""
    model = _probe().train()
    x = torch.rand(3, 1, *model.vit.img_size, generator=torch.Generator().manual_seed(2))
    z = model.vit(x)
    flat = z.reshape(-1, z.shape[-1])
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    torch.testing.assert_close(model(x), _by_hand(model, x, (z - mean) / torch.sqrt(var + 1e-5)), rtol=1e-3, atol=1e-4)
    momentum = model.norm.momentum
    torch.testing.assert_close(model.norm.running_mean, momentum * mean, rtol=1e-4, atol=1e-6)
    model.eval()
    stats = model.norm.running_mean.clone(), model.norm.running_var.clone()
    fixed = (z - stats[0]) / torch.sqrt(stats[1] + 1e-5)
    torch.testing.assert_close(model(x), _by_hand(model, x, fixed), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.norm.running_mean, stats[0])  # evaluation does not move them


def test_a_standardising_probe_is_blind_to_each_channels_scale_and_offset():
    """Rescaling and shifting the encoder's output channels (its final LayerNorm's affine) by very different
    amounts leaves the standardising probe's logits as they were; the raw probe's change."""
    for norm, blind in (("batchnorm", True), ("none", False)):
        a, b = _probe(f"model.probe_norm={norm}").train(), _probe(f"model.probe_norm={norm}").train()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            scale = torch.exp(torch.empty(a.vit.hidden_size).uniform_(-0.5, 3, generator=g))  # x0.6 to x20
            b.vit.norm.weight.mul_(scale)
            b.vit.norm.bias.add_(torch.randn(a.vit.hidden_size, generator=g) * 5)
        x = torch.rand(2, 1, *a.vit.img_size, generator=g)
        same = torch.allclose(a(x), b(x), rtol=1e-3, atol=1e-3)
        assert same == blind, norm


def test_only_the_head_trains_and_the_encoder_stays_in_eval_mode():
    model = _probe().train()
    assert not model.vit.training and model.head.training and model.norm.training
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    x = torch.rand(2, 1, *model.vit.img_size)
    model(x).square().mean().backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.vit.parameters())


def test_a_probe_checkpoint_from_before_probe_norm_rebuilds_with_raw_tokens():
    """A probe saved before model.probe_norm existed fed its head raw tokens; its config has no such key, and
    it still loads, strictly, as the raw probe it was."""
    old = _probe("model.probe_norm=none")
    cfg = load_config("unetr-tiny", ["model.head=probe", "model.num_classes=3"]).to_dict()
    del cfg["model"]["probe_norm"]
    ckpt = Checkpoint(state=old.state_dict(), config=cfg, source="old.pt")
    rebuilt = model_from(ckpt, config_of(ckpt))
    assert isinstance(rebuilt.norm, torch.nn.Identity)


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
    assert set(tuned) - {f"vit.{k}" for k in vit} == {"head.weight", "head.bias", "norm.running_mean",
                                                       "norm.running_var", "norm.num_batches_tracked"}
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "last.pt")
    assert isinstance(predictor.model, LinearProbe)
