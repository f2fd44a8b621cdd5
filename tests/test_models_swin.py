"""SimMIM on MONAI's Swin transformer: what the stages see, what the loss counts, the weights' fit to Swin UNETR,
and that a few steps learn. Tiny sizes: feature_size 12, one block per stage, 32^3 voxels."""

from __future__ import annotations

import pytest
import torch

from medmim.config import Config, ModelConfig
from medmim.errors import MedmimError
from medmim.models import build_pretrainer
from medmim.models.masking import TokenMask, mask_to_image
from medmim.models.swin import SwinSimMIM3D, build_swin_encoder, default_mask_patch_size, pixel_shuffle_3d

SWIN = dict(depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)


def tiny_cfg(**swin) -> ModelConfig:
    return ModelConfig(backbone="swin", in_channels=1, img_size=32, feature_size=12, swin={**SWIN, **swin})


def tiny_model(**kw) -> SwinSimMIM3D:
    return SwinSimMIM3D(encoder=build_swin_encoder(tiny_cfg()), **kw)


def batch(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, 32, generator=g)
    x[:, :, 8:20, 8:20] += 1.0  # some structure to reconstruct
    return x


def fixed_mask(model, n=2, seed=1) -> TokenMask:
    return model.random_mask(n, (16, 16, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _seed_one_thread():
    # one thread: on a busy machine, intra-op threads waiting on each other make these steps many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def stage_input_of(model, x, mask):
    seen = {}
    handle = model.encoder.layers1[0].register_forward_pre_hook(lambda m, inputs: seen.update(h=inputs[0].clone()))
    try:
        out = model(x, mask=mask)
    finally:
        handle.remove()
    return seen["h"], out


def test_masked_tokens_enter_the_first_stage_as_the_mask_token():
    model = tiny_model().eval()
    x = batch()
    mask = fixed_mask(model)
    h, _ = stage_input_of(model, x, mask)  # [N, E, 16, 16, 16]
    hidden = mask.mask.reshape(2, 16, 16, 16)
    tokens = h.permute(0, 2, 3, 4, 1)  # [N, 16, 16, 16, E]
    assert torch.equal(tokens[hidden], model.mask_token.reshape(1, -1).expand(int(hidden.sum()), -1))
    # the visible ones are the patch embeddings of their own voxels
    embedded = model.encoder.patch_embed(x).permute(0, 2, 3, 4, 1)
    assert torch.equal(tokens[~hidden], embedded[~hidden])


def test_the_model_never_sees_masked_voxels():
    model = tiny_model().eval()
    x = batch()
    mask = fixed_mask(model)
    voxels = mask_to_image(mask.mask, (16, 16, 16), model.patch_size).bool()  # [N, 1, D, H, W]
    other = torch.where(voxels, torch.randn_like(x) * 5.0, x)  # differs only inside the masked blocks
    assert not torch.equal(other, x)
    h1, o1 = stage_input_of(model, x, mask)
    h2, o2 = stage_input_of(model, other, mask)
    assert torch.equal(h1, h2)
    assert torch.equal(o1.pred, o2.pred)


def test_without_a_mask_the_stages_are_monais_forward():
    for use_v2 in (False, True):
        encoder = build_swin_encoder(tiny_cfg(use_v2=use_v2)).eval()
        model = SwinSimMIM3D(encoder=encoder).eval()
        x = batch()
        none = torch.zeros(2, 16 ** 3, dtype=torch.bool)
        with torch.no_grad():
            assert torch.equal(model.forward_encoder(x, none), encoder(x, normalize=True)[4])


def test_loss_is_the_mean_error_over_masked_voxels():
    model = tiny_model().eval()
    x = batch()
    out = model(x, mask=fixed_mask(model))
    m = out.mask.bool().expand_as(x)
    assert torch.allclose(out.loss, (out.pred - x).abs()[m].mean(), rtol=1e-5, atol=1e-7)
    l2 = tiny_model(loss="l2").eval()
    out = l2(x, mask=fixed_mask(l2))
    assert torch.allclose(out.loss, (out.pred - x).square()[out.mask.bool().expand_as(x)].mean(), rtol=1e-5)


def test_one_masked_block_is_all_the_loss_counts():
    model = tiny_model().eval()
    x = batch(n=1)
    blocks = torch.zeros(1, 2, 2, 2)  # 32^3 voxels in blocks of 16^3
    blocks[0, 0, 1, 0] = 1.0  # voxels [0:16, 16:32, 0:16]
    token_mask = mask_to_image(blocks, (2, 2, 2), model.mask_size).reshape(1, -1).bool()  # [1, 16^3]
    out = model(x, mask=token_mask)
    assert int(out.token_mask.sum()) == 8 ** 3 and out.mask.sum() == 16 ** 3
    block = (out.pred - x)[:, :, 0:16, 16:32, 0:16].abs().mean()
    assert torch.allclose(out.loss, block, rtol=1e-5, atol=1e-7)


def test_output_shapes_and_masks_in_blocks():
    model = tiny_model(mask_ratio=0.75)
    assert model.patch_size == (2, 2, 2) and model.mask_patch_size == (16, 16, 16) and model.mask_size == (8, 8, 8)
    x = batch()
    out = model(x, generator=torch.Generator().manual_seed(3))
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.pred.shape == x.shape and out.pred.dtype == torch.float32 and not out.pred.requires_grad
    assert out.mask.shape == (2, 1, 32, 32, 32) and out.token_mask.shape == (2, 16 ** 3)
    assert out.token_mask.dtype == torch.bool
    assert out.mask.mean().item() == pytest.approx(0.75)  # 6 of 8 blocks
    # the voxel mask is constant over each 16^3 block (and agrees with the token mask)
    cells = out.mask.reshape(2, 1, 2, 16, 2, 16, 2, 16)
    assert torch.equal(cells.amax(dim=(3, 5, 7)), cells.amin(dim=(3, 5, 7)))
    assert torch.equal(out.mask, mask_to_image(out.token_mask, (16, 16, 16), (2, 2, 2)))
    # smaller blocks, as asked
    small = tiny_model(mask_patch_size=4)
    cells = small(x).mask.reshape(2, 1, 8, 4, 8, 4, 8, 4)
    assert torch.equal(cells.amax(dim=(3, 5, 7)), cells.amin(dim=(3, 5, 7)))


def test_default_mask_block():
    assert default_mask_patch_size((2, 2, 2)) == (16, 16, 16)
    assert default_mask_patch_size((4, 2, 3)) == (16, 16, 3)


def test_pixel_shuffle_3d_puts_channels_into_their_voxels():
    x = torch.randn(2, 3 * 2 * 4 * 1, 2, 3, 5)
    y = pixel_shuffle_3d(x, (2, 4, 1))  # [2, 3, 4, 12, 5]
    assert y.shape == (2, 3, 4, 12, 5)
    c, i, j, d, h, w = 1, 1, 3, 1, 2, 4
    assert y[0, c, d * 2 + i, h * 4 + j, w] == x[0, c * 8 + i * 4 + j, d, h, w]


@pytest.mark.parametrize("kw, setting", [
    (dict(mask_patch_size=3), "mask_patch_size"),
    (dict(mask_patch_size=(16, 16, 5)), "mask_patch_size"),
    (dict(decoder_depth=2), "decoder_depth"),
    (dict(norm_pix_loss=True), "norm_pix_loss"),
    (dict(loss="huber"), "loss"),
])
def test_refusals_name_the_setting(kw, setting):
    with pytest.raises(MedmimError, match=setting):
        tiny_model(**kw)


def test_encoder_refusals_and_input_sizes():
    cfg = tiny_cfg()  # the config refuses other stage counts too; the builder does on its own
    three = cfg.model_copy(update={"swin": cfg.swin.model_copy(update={"depths": (1, 1, 1), "num_heads": (1, 1, 2)})})
    with pytest.raises(MedmimError, match="model.swin.depths"):
        build_swin_encoder(three)
    with pytest.raises(MedmimError, match="model.feature_size"):
        build_swin_encoder(tiny_cfg().model_copy(update={"feature_size": 16}))
    with pytest.raises(MedmimError, match="input size"):
        tiny_model()(torch.rand(1, 1, 32, 32, 48))


@pytest.mark.parametrize("use_v2", [False, True])
def test_encoder_weights_are_swin_unetrs(use_v2):
    from monai.networks.nets import SwinUNETR

    encoder = build_swin_encoder(tiny_cfg(use_v2=use_v2)).eval()
    unetr = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=SWIN["depths"],
                      num_heads=SWIN["num_heads"], window_size=4, patch_size=2, use_v2=use_v2).eval()
    unetr.swinViT.load_state_dict(encoder.state_dict(), strict=True)
    x = batch()
    with torch.no_grad():
        for a, b in zip(encoder(x), unetr.swinViT(x)):
            assert torch.equal(a, b)
    # and back: Swin UNETR's encoder loads into a fresh one
    fresh = build_swin_encoder(tiny_cfg(use_v2=use_v2))
    fresh.load_state_dict(unetr.swinViT.state_dict(), strict=True)


def test_build_pretrainer_makes_it_from_the_config():
    cfg = Config(task="pretrain", model=tiny_cfg().model_dump(), pretrain={"method": "simmim"})
    model = build_pretrainer(cfg)
    assert isinstance(model, SwinSimMIM3D)
    assert model.loss_kind == "l1" and model.mask_ratio == cfg.pretrain.simmim.mask_ratio
    assert model(batch(n=1)).pred.shape == (1, 1, 32, 32, 32)


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    x, mask = batch(n=1), fixed_mask(model, n=1)
    model(x, mask=mask).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(b.use_checkpoint for b in model.encoder.layers1[0].blocks)
    model(x, mask=mask).loss.backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-6)


def test_a_few_steps_reduce_the_loss():
    model = tiny_model()
    x = batch(n=1)
    mask = fixed_mask(model, n=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = model(x, mask=mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
