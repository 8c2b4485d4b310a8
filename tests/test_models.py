"""Pretraining and fine-tuning models: shapes, losses, masking, published parameter names."""
import pytest
import torch

from models_mae import MaskedAutoencoderViT, random_masking
from util.pos_embed import get_2d_sincos_pos_embed
import models_convmae  # noqa: F401  (registers the models; it imports models_mae and models_vit)
from util.registry import finetune_models, pretrain_models

TINY_PRETRAIN = ["mae_vit_tiny_patch16", "dmae_vit_tiny_patch16",
                 "convmae_convvit_tiny_patch16", "dconvmae_convvit_tiny_patch16"]
SIZES = [(224, 224), (256, 192)]


def make(name, **kw):
    torch.manual_seed(0)
    return pretrain_models().create(name, **kw).eval()


@pytest.mark.parametrize("name", TINY_PRETRAIN)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chans", [1, 3])
def test_pretrain_shapes_and_loss(name, size, chans):
    model = make(name, img_size=size, in_chans=chans)
    imgs = torch.randn(2, chans, *size)
    loss, pred, mask = model(imgs, imgs + 0.1, mask_ratio=0.75)
    num_patches = (size[0] // 16) * (size[1] // 16)
    assert pred.shape == (2, num_patches, 16 * 16 * chans)
    assert mask.shape == (2, num_patches)
    assert torch.equal(mask.sum(1), torch.full((2,), float(num_patches - int(num_patches * 0.25))))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert model.unpatchify(model.patchify(imgs)).equal(imgs)


def test_deblurring_names_default_to_all_patch_loss():
    reg = pretrain_models()
    for name in TINY_PRETRAIN:
        expected = "all" if name.startswith("d") else "masked"
        assert reg.create(name).loss_on == expected
    assert reg.create("mae_vit_tiny_patch16", loss_on="all").loss_on == "all"


def test_patch_order_is_pixel_major_channel_last():
    model = make("mae_vit_tiny_patch16", img_size=32, in_chans=3)
    imgs = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32)
    patches = model.patchify(imgs)
    # patch (row 0, col 1), pixel (p=0, q=1), channel 2
    assert patches[0, 1, (0 * 16 + 1) * 3 + 2] == imgs[0, 2, 0, 16 + 1]
    # patch (row 1, col 0), pixel (p=3, q=0), channel 0
    assert patches[0, 2, (3 * 16 + 0) * 3 + 0] == imgs[0, 0, 16 + 3, 0]


@pytest.mark.parametrize("name", TINY_PRETRAIN)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_by_hand(name, norm_pix):
    model = make(name, img_size=64, in_chans=1, norm_pix_loss=norm_pix)
    imgs, target = torch.randn(2, 1, 64, 64), torch.randn(2, 1, 64, 64)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    for region in ("masked", "all"):
        model.loss_on = region
        loss, pred, mask = model(imgs, target, mask_ratio=0.75, noise=noise)
        t = target.reshape(2, 1, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 256)
        if norm_pix:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - t) ** 2).mean(-1)
        expected = per_patch.mean() if region == "all" else (per_patch * mask).sum() / mask.sum()
        torch.testing.assert_close(loss, expected)
    # the two regions really differ on random data
    model.loss_on = "masked"
    masked_loss = model(imgs, target, noise=noise)[0]
    model.loss_on = "all"
    assert not torch.isclose(masked_loss, model(imgs, target, noise=noise)[0])


def test_masking_with_injected_noise_is_reproducible():
    noise = torch.rand(3, 20)
    keep1, mask1, restore1 = random_masking(3, 20, 0.75, "cpu", noise)
    keep2, mask2, _ = random_masking(3, 20, 0.75, "cpu", noise.clone())
    assert torch.equal(keep1, keep2) and torch.equal(mask1, mask2)
    # kept ids are exactly the 5 smallest noises, and they are the unmasked tokens
    assert torch.equal(keep1.sort(1).values, noise.argsort(1)[:, :5].sort(1).values)
    assert torch.equal(mask1.gather(1, keep1), torch.zeros(3, 5))
    assert torch.equal(restore1.argsort(1), noise.argsort(1))
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(3, 20, 0.75, "cpu", torch.rand(3, 21))


def _latent_in_image_order(model, imgs, noise):
    ids_keep, mask, _ = random_masking(imgs.shape[0], model.num_patches, 0.0, imgs.device, noise)
    latent = model.forward_encoder(imgs, ids_keep, mask)[:, model.num_prefix_tokens:]
    out = torch.empty_like(latent)
    out.scatter_(1, ids_keep.unsqueeze(-1).expand_as(latent), latent)
    return out


@pytest.mark.parametrize("name", TINY_PRETRAIN)
def test_no_masking_encoder_is_permutation_equivariant(name):
    model = make(name, img_size=(64, 48), in_chans=3)
    imgs = torch.randn(2, 3, 64, 48)
    n = model.num_patches
    a = _latent_in_image_order(model, imgs, torch.rand(2, n))
    b = _latent_in_image_order(model, imgs, torch.rand(2, n))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    pred_a = model(imgs, mask_ratio=0.0, noise=torch.rand(2, n))[1]
    pred_b = model(imgs, mask_ratio=0.0, noise=torch.rand(2, n))[1]
    torch.testing.assert_close(pred_a, pred_b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["convmae_convvit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_masked_pixels_do_not_leak_into_visible_tokens(name):
    model = make(name, img_size=(64, 80), in_chans=1)
    gh, gw = model.grid
    imgs = torch.randn(1, 1, 64, 80)
    noise = torch.rand(1, gh * gw, generator=torch.Generator().manual_seed(3))
    ids_keep, mask, _ = random_masking(1, gh * gw, 0.75, "cpu", noise)
    base = model.forward_encoder(imgs, ids_keep, mask)

    pixel_mask = mask.reshape(1, 1, gh, 1, gw, 1).expand(1, 1, gh, 16, gw, 16).reshape(1, 1, 64, 80)
    changed = torch.where(pixel_mask.bool(), torch.randn_like(imgs) * 10, imgs)
    torch.testing.assert_close(model.forward_encoder(changed, ids_keep, mask), base, atol=1e-6, rtol=0)

    # control: changing a *visible* patch does change the output (the test can fail)
    visible = changed.clone()
    row, col = divmod(int(ids_keep[0, 0]), gw)
    visible[..., row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] += 5
    assert not torch.allclose(model.forward_encoder(visible, ids_keep, mask), base, atol=1e-3)


def test_mask_ratio_zero_masked_loss_is_finite():
    model = make("mae_vit_tiny_patch16", img_size=32)
    loss = model(torch.randn(1, 3, 32, 32), mask_ratio=0.0)[0]
    assert torch.isfinite(loss) and loss == 0


def test_bad_sizes_are_refused_clearly():
    with pytest.raises(ValueError, match="divisible"):
        pretrain_models().create("convmae_convvit_tiny_patch16", img_size=100)
    with pytest.raises(ValueError, match="divisible"):
        MaskedAutoencoderViT(img_size=(64, 50), patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="Valid names: .*dmae_vit_base_patch16"):
        pretrain_models().create("dmae_vit_bse_patch16")


def test_sincos_pos_embed_layout():
    emb = get_2d_sincos_pos_embed(8, (2, 3), cls_token=True)
    assert emb.shape == (7, 8)
    assert torch.equal(emb[0], torch.zeros(8))
    grid = emb[1:].reshape(2, 3, 8)
    # first half encodes the column only, second half the row only
    assert torch.equal(grid[0, :, :4], grid[1, :, :4])
    assert torch.equal(grid[:, 0, 4:], grid[:, 2, 4:])
    # position 0: sin 0 = 0, cos 0 = 1; column 1, lowest frequency 1: sin(1)
    assert torch.equal(grid[0, 0], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    assert torch.isclose(grid[0, 1, 0], torch.sin(torch.tensor(1.0)))


# --------------------------------------------------------------------- fine-tuning models
@pytest.mark.parametrize("name", ["vit_tiny_patch16", "convvit_tiny_patch16"])
@pytest.mark.parametrize("global_pool", [True, False])
def test_finetune_models(name, global_pool):
    model = finetune_models().create(name, num_classes=3, img_size=(64, 48), in_chans=1,
                                     global_pool=global_pool, drop_path_rate=0.1).eval()
    x = torch.randn(2, 1, 64, 48)
    assert model(x).shape == (2, 3)
    keys = model.state_dict().keys()
    assert ("fc_norm.weight" in keys) == global_pool
    assert ("norm.weight" in keys) == (not global_pool)


def test_convvit_pools_patch_tokens_not_first_token():
    model = finetune_models().create("convvit_tiny_patch16", num_classes=2, img_size=32,
                                     global_pool=False).eval()
    x = torch.randn(1, 3, 32, 32)
    _, _, tokens = model.forward_stages(x)
    torch.testing.assert_close(model.forward_features(x), model.norm(tokens).mean(1))
    assert not torch.allclose(model.forward_features(x), model.norm(tokens)[:, 0])


def test_feature_pyramids():
    conv = finetune_models().create("convvit_tiny_patch16", num_classes=0, img_size=(64, 96)).eval()
    feats = conv.forward_pyramid(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 24), (1, 48, 8, 12), (1, 96, 4, 6)]
    vit = finetune_models().create("vit_tiny_patch16", num_classes=0, img_size=(64, 96)).eval()
    feats = vit.forward_pyramid(torch.randn(1, 3, 64, 96), indices=(0, 1))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 4, 6)] * 2


# --------------------------------------------------------------------- names
def test_every_model_name_is_a_greppable_def_of_its_model_file():
    import inspect

    import models_convmae
    import models_mae
    import models_vit
    sources = {m.__name__: inspect.getsource(m) for m in (models_mae, models_convmae, models_vit)}
    for registry, files in ((pretrain_models(), ("models_mae", "models_convmae")), (finetune_models(), ("models_vit",))):
        for name in registry.names():
            factory = registry._factories[name]
            assert factory.__name__ == name and factory.__module__ in files, name
            assert f"\ndef {name}(**kwargs):" in sources[factory.__module__], name
    published = [f"{p}_vit_{s}" for p in ("mae", "dmae")
                 for s in ("base_patch16", "large_patch16", "huge_patch14", "base_patch8", "base_patch28")]
    published += [f"{p}_convvit_{s}_patch16" for p in ("convmae", "dconvmae") for s in ("base", "large", "huge")]
    assert set(published) | {f"{n}_dec512d8b" for n in published} <= set(pretrain_models().names())
    assert {"vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "convvit_base_patch16",
            "convvit_large_patch16", "convvit_huge_patch16", "vit_tiny_patch16"} <= set(finetune_models().names())


def test_model_constructors_document_their_arguments():
    import inspect

    from models_convmae import MaskedAutoencoderConvViT
    from models_vit import ConvViT, VisionTransformer
    for cls in (MaskedAutoencoderViT, MaskedAutoencoderConvViT, ConvViT):
        doc = inspect.getdoc(cls.__init__) or ""
        documented = {line.split(":")[0].strip() for line in doc.split("Args:")[-1].splitlines() if ":" in line}
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params <= documented, (cls.__name__, params - documented)
    assert "Args:" in inspect.getdoc(VisionTransformer.__init__)


def test_an_empty_registry_says_which_modules_fill_it():
    from util.registry import ModelRegistry
    with pytest.raises(ValueError, match="no fine-tuning models are registered yet; import models_vit"):
        ModelRegistry("fine-tuning model", modules=("models_vit",)).create("vit_base_patch16")
