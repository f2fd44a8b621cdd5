"""The speed-ups give the numbers of the plain paths they replace (float tolerance), on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmim.config import config_from_dict
from medmim.eval.inference import PredictOptions, Predictor, _softmax_
from medmim.models import UNETR, SimMIM3D, ViT3D
from medmim.models.layers import Attention
from medmim.models.unetr import TrainChannelsLastConv3d, TrainChannelsLastConvTranspose3d, plain_layers

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: one thread avoids OpenMP barriers stalling on a busy machine (tests run in parallel)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(in_channels=1, img_size=32, patch_size=16, hidden_size=48, num_layers=4, num_heads=4, mlp_dim=96)


def test_unetr_uses_the_fast_layers_and_keeps_its_state_dict():
    unetr = UNETR(encoder=ViT3D(**TINY), num_classes=3, feature_size=4)
    convs = [m for m in unetr.modules() if type(m) in (nn.Conv3d, nn.ConvTranspose3d)]
    assert convs == [unetr.vit.patch_embed.proj]  # every decoder convolution is swapped, the ViT's is not
    assert unetr.state_dict().keys() == plain_layers(unetr).state_dict().keys()
    assert all(p.is_contiguous() for p in unetr.parameters())  # checkpoints stay channels-first


def test_unetr_inference_and_training_equal_the_plain_path():
    torch.manual_seed(0)
    unetr = UNETR(encoder=ViT3D(**TINY), num_classes=3, feature_size=4).eval()
    plain = plain_layers(unetr)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(unetr(x), plain(x), rtol=1e-5, atol=1e-5)
    # a training step (channels-last convolutions): the same loss and gradients up to float rounding
    unetr.train(), plain.train()
    la, lb = unetr(x).square().mean(), plain(x).square().mean()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    # (tolerance on the scale of all gradients: encoder1's 1x1 conv on the 1-channel image, instance-normed
    # right after, has a gradient of pure rounding noise)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, pa), (_, pb) in zip(unetr.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # and the optimizer sees channels-first gradients, like its parameters
    assert all(p.grad.is_contiguous() for p in unetr.parameters() if p.grad is not None)


def test_simmim_mask_token_select_equals_the_blend():
    torch.manual_seed(0)
    model = SimMIM3D(encoder=ViT3D(**{**TINY, "patch_size": 8}), mask_ratio=0.6)
    x = torch.randn(2, 1, 32, 32, 32)
    patches, grid = model.encoder.patchify(x)
    mask = model.random_mask(2, grid, generator=torch.Generator().manual_seed(1)).mask

    def blend():  # the formula before: tokens * (1 - w) + mask_token * w
        tokens = model.encoder.patch_embed(patches)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - w) + model.mask_token * w
        return model.encoder.forward_tokens(tokens + model.encoder.pos_embed_for(grid))

    out_fast, out_ref = model.forward_encoder(patches, grid, mask), blend()
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=1e-6)
    g_fast = torch.autograd.grad(out_fast.sum(), [model.mask_token, model.encoder.patch_embed.proj.weight])
    g_ref = torch.autograd.grad(out_ref.sum(), [model.mask_token, model.encoder.patch_embed.proj.weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_in_place_softmax_equals_softmax():
    logits = torch.randn(1, 5, 7, 6, 4) * 20
    ref = torch.softmax(logits, dim=1)
    out = _softmax_(logits)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_predictor_equals_monai_sliding_window_with_the_plain_model():
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    unetr = UNETR(encoder=ViT3D(**TINY), num_classes=3, feature_size=4)
    cfg = config_from_dict({"task": "finetune", "model": {**TINY, "img_size": [32, 32, 32],
                                                          "patch_size": [16, 16, 16], "num_classes": 3,
                                                          "feature_size": 4}})
    plain = plain_layers(unetr).eval()
    predictor = Predictor(unetr, cfg, PredictOptions(sw_batch_size=3, overlap=0.5, device="cpu"))
    image = np.random.default_rng(0).random((1, 48, 40, 33), dtype=np.float32)
    probs = predictor.probabilities(image)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(image)[None], (32, 32, 32), 3, plain, overlap=0.5,
                                          mode="gaussian")
    ref = torch.softmax(logits, dim=1)[0]
    assert probs.shape == ref.shape == (3, 48, 40, 33)
    torch.testing.assert_close(probs, ref, rtol=1e-5, atol=1e-5)


def test_attention_is_sdpa_on_the_right_layout():
    """Fused attention == softmax(q k^T / sqrt(d)) v with heads split as (3, heads, head_dim)."""
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=4)
    x = torch.randn(2, 10, 48)
    qkv = attn.qkv(x).reshape(2, 10, 3, 4, 12)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [N, heads, L, head_dim]
    w = torch.softmax(q @ k.transpose(-1, -2) / 12**0.5, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 10, 48))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), w @ v, rtol=1e-5, atol=1e-5)


# (PyTorch's fused AdamW against its for-loop one, a check of PyTorch alone: benchmarks/check_fused_adamw.py)


def test_class_dice_equals_monai_dice_metric():
    """The confusion-matrix Dice == MONAI's DiceMetric on one-hot maps, NaN for a class absent from the label."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medmim.train.tasks import class_dice

    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 4, (1, 20, 18, 16)))  # classes 0..3; class 4 absent
    pred = label.clone()
    pred[0, :5] = torch.from_numpy(rng.integers(0, 5, (5, 18, 16)))  # some errors, some class-4 false positives
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    metric(one_hot(pred[:, None], 5), one_hot(label[:, None], 5))
    ref = metric.aggregate().numpy()[0]
    got = class_dice(pred, label.to(torch.uint8), 5)
    assert np.isnan(ref[3]) and np.isnan(got[3])
    np.testing.assert_array_equal(got[:3], ref[:3])  # the same float32 values


def test_validation_equals_the_plain_monai_path_and_repeats_itself(tmp_path):
    """SegmentationTask.validate (volumes kept in memory, window weights computed once, confusion-matrix Dice)
    == MONAI's sliding window (its own weights) + DiceMetric on one-hot maps, at the first validation and
    at the next (from memory)."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medmim.config import load_config
    from medmim.data.prepare import PrepareSettings, prepare_dataset
    from medmim.data.selection import finetune_cases, resolve_caches
    from medmim.train.tasks import task_for
    from tests.conftest import write_msd

    root = write_msd(tmp_path / "ds", n_labeled=4, n_unlabeled=0, shape=(40, 36, 24))
    prepare_dataset(root, tmp_path / "cache", PrepareSettings(spacing=(1.5, 1.5, 2.0)))
    cfg = load_config("unetr-tiny", [f"data.path={tmp_path / 'cache'}", "model.num_classes=4", "train.sw_overlap=0.5"])
    cases = finetune_cases(resolve_caches(cfg.data, log=lambda s: None), 0, 1.0, 0)
    task = task_for(cfg, cases, torch.device("cpu"))
    torch.manual_seed(0)
    model = task.build_model(log=lambda s: None).eval()
    with torch.no_grad():
        rows = [task.validate(model), task.validate(model)]
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        for case in cases.val:
            x = torch.from_numpy(np.asarray(case.image(), dtype=np.float32))[None]
            y = torch.from_numpy(np.asarray(case.label(), dtype=np.int64))[None, None]
            logits = sliding_window_inference(x, cfg.model.img_size, cfg.train.sw_batch_size, model,
                                              overlap=0.5, mode="gaussian")
            metric(one_hot(logits.argmax(1, keepdim=True), 4), one_hot(y, 4))
    per_class = np.nanmean(metric.aggregate().numpy(), axis=0)
    assert len(task._val_volumes) == len(cases.val) >= 1  # kept for the next validation
    for row in rows:
        assert row["val_dice"] == pytest.approx(float(np.nanmean(per_class)), rel=1e-6)
        for c in range(1, 4):
            assert row[f"dice_{c}"] == pytest.approx(float(per_class[c - 1]), rel=1e-6, nan_ok=True)


def test_fused_channels_last_instance_norm_equals_pytorchs(monkeypatch):
    """The compiled channels-last instance norm of a CPU training step == nn.InstanceNorm3d, gradient included
    (thresholds lowered so that a small tensor takes the fused path)."""
    import medmim.models.unetr as unetr_mod

    monkeypatch.setattr(unetr_mod, "FUSED_NORM_MIN_ELEMENTS", 0)
    norm = unetr_mod.TrainChannelsLastInstanceNorm3d(8).train()
    x = torch.randn(2, 8, 12, 10, 9).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    g = torch.randn(2, 8, 12, 10, 9)
    y = norm(x)
    if unetr_mod._fused_norm is False:
        pytest.skip("inductor cannot compile here (no C++ compiler?): PyTorch's instance norm is used")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)  # no copy to channels-first and back
    ref = nn.InstanceNorm3d(8)(ref_x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)
    # UNETR's decoder uses it; plain_layers gives PyTorch's back
    unetr = UNETR(encoder=ViT3D(**TINY), num_classes=3, feature_size=4)
    assert any(type(m) is unetr_mod.TrainChannelsLastInstanceNorm3d for m in unetr.modules())
    assert not any(type(m) is unetr_mod.TrainChannelsLastInstanceNorm3d for m in plain_layers(unetr).modules())
