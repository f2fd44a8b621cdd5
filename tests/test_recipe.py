"""Fine-tuning recipe options: layer-wise learning-rate decay, stochastic depth, a decoder-only warm-up."""

from __future__ import annotations

import pytest
import torch

from medmim.config import load_config
from medmim.data.selection import RunCases
from medmim.models import ViT3D, build_encoder
from medmim.train.step import make_optimizer, make_scheduler
from medmim.train.tasks import task_for

LABELS = {0: "background", 1: "a", 2: "b"}


def _unetr(overrides: list[str]):
    cfg = load_config("unetr-tiny", ["model.num_classes=3", "train.warmup_steps=0", *overrides])
    task = task_for(cfg, RunCases([], [], LABELS, [], 1), torch.device("cpu"))
    torch.manual_seed(0)
    return cfg, task, task.build_model(log=lambda s: None)


def _lr_of(optimizer, model) -> dict[str, float]:
    group_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: group_of[id(p)] for n, p in model.named_parameters()}


def test_layer_decay_gives_each_vit_layer_its_rate():
    """4 blocks, decay 0.5, peak 1e-3: embeddings 1e-3 x 0.5^5, block i 1e-3 x 0.5^(4 - i), the rest 1e-3."""
    cfg, task, model = _unetr(["train.layer_decay=0.5"])
    assert cfg.model.num_layers == 4
    lr = _lr_of(make_optimizer(model, cfg, 1e-3, task.lr_scale()), model)
    assert lr["vit.patch_embed.proj.weight"] == pytest.approx(3.125e-5)
    assert lr["vit.blocks.0.attn.qkv.weight"] == pytest.approx(6.25e-5)
    assert lr["vit.blocks.1.mlp.fc1.bias"] == pytest.approx(1.25e-4)
    assert lr["vit.blocks.3.norm2.weight"] == pytest.approx(5e-4)
    assert lr["vit.norm.weight"] == pytest.approx(1e-3)
    decoder = [n for n in lr if not n.startswith("vit.")]
    assert decoder and all(lr[n] == pytest.approx(1e-3) for n in decoder)


def test_without_a_recipe_every_parameter_has_the_one_rate():
    cfg, task, model = _unetr([])
    assert task.lr_scale() is None
    optimizer = make_optimizer(model, cfg, 1e-3, task.lr_scale())
    assert len(optimizer.param_groups) == 2 and set(_lr_of(optimizer, model).values()) == {1e-3}


def test_frozen_encoder_does_not_move_then_trains():
    cfg, task, model = _unetr(["train.freeze_encoder_steps=2", "train.layer_decay=0.75"])
    optimizer = make_optimizer(model, cfg, 1e-3, task.lr_scale())
    scheduler = make_scheduler(optimizer, cfg, total_steps=10, peak_lr=1e-3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.rand(2, 1, *cfg.data.roi_size, generator=torch.Generator().manual_seed(0))

    def step() -> dict[str, bool]:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        return {n: not torch.equal(p, start[n]) for n, p in model.named_parameters()}

    for _ in range(2):
        moved = step()
        assert not any(m for n, m in moved.items() if n.startswith("vit."))  # weight decay included: lr is 0
        assert moved["out.conv.conv.weight"]  # the decoder trains from the first step
    moved = step()
    assert moved["vit.blocks.0.attn.qkv.weight"] and moved["vit.patch_embed.proj.weight"]


def test_drop_path_rises_over_the_blocks_and_is_off_in_evaluation():
    kw = dict(in_channels=1, img_size=16, patch_size=8, hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32)
    torch.manual_seed(0)
    vit = ViT3D(**kw, drop_path=0.4)
    assert [b.drop_path for b in vit.blocks] == pytest.approx([0.0, 0.2, 0.4])
    plain = ViT3D(**kw)
    plain.load_state_dict(vit.state_dict())
    x = torch.rand(8, 1, 16, 16, 16)
    vit.eval(), plain.eval()
    torch.testing.assert_close(vit(x), plain(x), rtol=0, atol=0)
    vit.train()
    torch.manual_seed(1)
    a = vit(x)
    torch.manual_seed(2)
    assert not torch.equal(a, vit(x))  # a random set of samples skips each branch
    assert build_encoder(load_config("unetr-tiny", ["model.drop_path=0.1"]).model).blocks[-1].drop_path == pytest.approx(0.1)
