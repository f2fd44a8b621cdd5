"""MAE, SimMIM and SimCLR: what the encoder sees, what the loss counts, and that a step learns."""

from __future__ import annotations

import pytest
import torch

from medmim.config import load_config
from medmim.errors import MedmimError
from medmim.models import MAE3D, SimCLR3D, SimMIM3D, ViT3D, build_pretrainer, count_parameters, random_masking
from medmim.models.mim import MaskedImageModel


def tiny_vit(**kw) -> ViT3D:
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96)
    args.update(kw)
    return ViT3D(**args)


def batch(seed=0, shape=(2, 1, 32, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    x[:, :, 8:20, 8:20] += 1.0  # some structure to reconstruct
    return x


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_mae_encoder_sees_only_visible_tokens(ratio):
    mae = MAE3D(encoder=tiny_vit(), mask_ratio=ratio, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    seen = {}

    def tokens_into(name):
        def hook(module, inputs):
            seen[name] = inputs[0].shape[1]  # [N, tokens, ...]
        return hook

    mae.encoder.patch_embed.register_forward_pre_hook(tokens_into("embedded"))
    mae.encoder.blocks[0].register_forward_pre_hook(tokens_into("block"))
    mae.decoder_blocks[0].register_forward_pre_hook(tokens_into("decoder"))
    out = mae(batch())
    visible = round((1 - ratio) * 64)
    assert seen == {"embedded": visible, "block": visible, "decoder": 64}
    assert out.pred.shape == (2, 1, 32, 32, 32)
    assert out.mask.shape == (2, 1, 32, 32, 32)
    assert out.token_mask.shape == (2, 64) and (out.token_mask.sum(1) == 64 - visible).all()
    assert out.mask.mean().item() == pytest.approx(1 - visible / 64)


@pytest.mark.parametrize("cls", [MAE3D, SimMIM3D])
@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_counts_masked_patches_only(cls, loss, norm_pix):
    model = cls(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4, loss=loss,
                norm_pix_loss=norm_pix)
    x = batch()
    patches, grid = model.encoder.patchify(x)
    mask = random_masking(2, grid, mask_ratio=0.75, generator=torch.Generator().manual_seed(0)).mask
    pred = torch.randn_like(patches)
    ref = model.forward_loss(patches, pred, mask)
    visible = ~mask
    # anything at visible patches, prediction or target, leaves the loss unchanged
    pred2, patches2 = pred.clone(), patches.clone()
    pred2[visible] += 5.0 * torch.randn_like(pred2[visible])
    patches2[visible] = torch.randn_like(patches2[visible])
    torch.testing.assert_close(model.forward_loss(patches2, pred2, mask), ref)
    # ...while a change at a masked patch does not
    pred2[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] += 1.0
    assert model.forward_loss(patches2, pred2, mask) != ref
    if not norm_pix:  # mean over masked voxels
        err = (pred - patches).abs() if loss == "l1" else (pred - patches).square()
        torch.testing.assert_close(ref, err[mask].mean())


@pytest.mark.parametrize("cls", [MAE3D, SimMIM3D])
def test_larger_mask_patch_masks_whole_blocks(cls):
    model = cls(encoder=tiny_vit(), mask_patch_size=16, mask_ratio=0.75, decoder_dim=32, decoder_depth=1,
                decoder_heads=4)
    out = model(batch(), generator=torch.Generator().manual_seed(3))
    vox = out.mask.reshape(2, 2, 16, 2, 16, 2, 16)  # 2x2x2 mask blocks of 16^3 voxels
    per_block = vox.permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 8, -1)
    assert ((per_block == 1).all(-1) | (per_block == 0).all(-1)).all()
    assert (per_block[..., 0].sum(1) == 6).all()  # round(0.25 * 8) = 2 visible blocks
    with pytest.raises(MedmimError, match="mask_patch_size"):
        cls(encoder=tiny_vit(), mask_patch_size=12)


def _one_step_reduces_loss(model, make_loss, lr=1e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    before = make_loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = make_loss()
    assert after.item() < before.item()


@pytest.mark.parametrize("depth", [0, 1])
def test_mae_step_reduces_loss(depth):
    mae = MAE3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=depth, decoder_heads=4)
    x = batch()
    mask = random_masking(2, (4, 4, 4), mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    _one_step_reduces_loss(mae, lambda: mae(x, mask=mask).loss)


@pytest.mark.parametrize("depth", [0, 1])
def test_simmim_step_reduces_loss(depth):
    simmim = SimMIM3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=depth, decoder_heads=4)
    x = batch()
    _one_step_reduces_loss(simmim, lambda: simmim(x, generator=torch.Generator().manual_seed(0)).loss)


def test_simclr_step_reduces_loss():
    simclr = SimCLR3D(encoder=tiny_vit(), proj_dim=16, temperature=0.2)
    x = batch(shape=(4, 1, 16, 16, 16))
    v1, v2 = x + 0.05 * torch.randn_like(x), x.flip(-1)
    out = simclr(v1, v2)
    assert out.z1.shape == out.z2.shape == (4, 16)
    _one_step_reduces_loss(simclr, lambda: simclr(v1, v2).loss)


def test_simmim_replaces_masked_tokens_by_the_mask_token():
    simmim = SimMIM3D(encoder=tiny_vit()).eval()
    x = batch()
    mask = random_masking(2, (4, 4, 4), mask_ratio=0.5, generator=torch.Generator().manual_seed(0)).mask
    y = x.clone()
    y[:, :, :8] += torch.randn_like(y[:, :, :8])  # change the first slab of patches (tokens 0..15)
    mask[:, :16] = True  # SimMIM takes any bool mask, counts may differ per sample
    torch.testing.assert_close(simmim(x, mask=mask).pred, simmim(y, mask=mask).pred)


def test_mae_works_on_non_cubic_inputs_and_fixed_bool_masks():
    mae = MAE3D(encoder=tiny_vit(img_size=(32, 32, 48)), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    x = batch(shape=(1, 1, 16, 32, 48))  # grid (2, 4, 6), not the img_size grid
    mask = torch.zeros(1, 48, dtype=torch.bool)
    mask[0, ::2] = True
    out = mae(x, mask=mask)
    assert out.pred.shape == x.shape and torch.equal(out.token_mask, mask)


def test_build_pretrainer_from_presets():
    mae = build_pretrainer(load_config("mae-tiny"))
    assert isinstance(mae, MAE3D) and mae.mask_ratio == 0.75 and len(mae.decoder_blocks) == 1
    simmim = build_pretrainer(load_config("simmim-tiny"))
    assert isinstance(simmim, SimMIM3D) and simmim.loss_kind == "l1" and len(simmim.decoder_blocks) == 0
    simclr = build_pretrainer(load_config("simclr-tiny"))
    assert isinstance(simclr, SimCLR3D) and simclr.temperature == 0.2
    study = build_pretrainer(load_config("mae-tiny", ["pretrain.mask_patch_size=16", "pretrain.mask_ratio=0.5"]))
    assert study.mask_size == (2, 2, 2)
    assert count_parameters(mae.encoder) == count_parameters(simclr.encoder)
    assert count_parameters(mae) > count_parameters(mae.encoder)


@pytest.mark.parametrize("cls", [MAE3D, SimMIM3D])
def test_mae_and_simmim_share_masking_decoder_and_loss(cls):
    model = cls(encoder=tiny_vit(), mask_patch_size=16, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    assert isinstance(model, MaskedImageModel) and model.mask_size == (2, 2, 2)
    # the same decoder under the same names: [Linear -> blocks -> norm] then the Linear to voxels
    assert [name for name, _ in model.named_children()] == ["encoder", "decoder_embed", "decoder_blocks",
                                                            "decoder_norm", "decoder_pred"]
    assert model.decoder_pred.out_features == 8 ** 3 and len(model.decoder_blocks) == 2
    width = 32 if cls is MAE3D else 48  # MAE's mask token enters the decoder, SimMIM's the encoder
    assert model.mask_token.shape == (1, 1, width)
    for bad, message in ((dict(loss="l3"), "loss must be 'l1' or 'l2'"), (dict(decoder_depth=-1), "decoder_depth")):
        with pytest.raises(MedmimError, match=message):
            cls(encoder=tiny_vit(), **bad)


def test_simmim_loads_a_state_dict_with_the_former_head_names():
    # SimMIM's decoder used to be head_embed / head_blocks / head_norm / head_pred; a state dict of those
    # (an old checkpoint, an old run resumed) loads strictly, under any prefix
    old = SimMIM3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    legacy = {k.replace("decoder_", "head_"): v for k, v in old.state_dict().items()}
    assert "head_blocks.0.attn.qkv.weight" in legacy and "head_pred.weight" in legacy
    torch.manual_seed(1)
    new = SimMIM3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    new.load_state_dict(legacy, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    wrapped = torch.nn.ModuleDict({"inner": SimMIM3D(encoder=tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=4)})
    wrapped.load_state_dict({f"inner.{k}": v for k, v in legacy.items()}, strict=True)
    assert torch.equal(wrapped["inner"].decoder_pred.weight, old.decoder_pred.weight)
