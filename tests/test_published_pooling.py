"""ConvViT's first-patch pooling: the published non-pooled ConvViT path (norm, then x[:, 0], the
first *patch* token, since ConvViT has no class token), written out here from the published forward."""
import pytest
import torch

import main_finetune
from models_vit import create_model


def test_first_patch_pooling_is_the_published_non_pooled_convvit_path():
    torch.manual_seed(0)
    model = create_model("convvit_tiny_patch16", img_size=48, num_classes=3, global_pool="first_patch").eval()
    with torch.no_grad():
        model.norm.weight.normal_()  # not the identity, so a missing norm would show
        x = torch.randn(2, 3, 48, 48)
        _, _, tokens = model.forward_stages(x)
        published = model.norm(tokens)[:, 0]
        torch.testing.assert_close(model.forward_features(x), published, rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.head(published), rtol=0, atol=0)
        # and our --cls_token pooling really is different: the mean of the normalised tokens
        averaged = create_model("convvit_tiny_patch16", img_size=48, num_classes=3, global_pool=False).eval()
        averaged.load_state_dict(model.state_dict())
        assert not torch.allclose(averaged.forward_features(x), published)
    assert "fc_norm.weight" not in model.state_dict()  # same weights as the --cls_token model


def test_first_patch_token_flag_reaches_the_model_and_is_refused_for_vit():
    args = main_finetune.get_args_parser().parse_args(
        ["--data_path", "x", "--model", "convvit_tiny_patch16", "--first_patch_token", "--nb_classes", "2",
         "--input_size", "32", "--in_chans", "1"])
    assert args.global_pool == "first_patch"
    assert main_finetune.build_model(args).global_pool == "first_patch"
    args.model = "vit_tiny_patch16"
    with pytest.raises(SystemExit, match="ConvViT only"):
        main_finetune.build_model(args)
    with pytest.raises(ValueError, match="global_pool must be"):
        create_model("convvit_tiny_patch16", img_size=32, global_pool="avg")
