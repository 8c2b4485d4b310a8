# UPerNet + ConvViT-B at 512x512, the published segmentation model of (Deblurring) ConvMAE.
# The backbone's features at strides 4/8/16/32 (stage 1, stage 2, stage 3, stage 3 downsampled by a
# stride-2 conv) have 256/384/768/768 channels; an auxiliary FCN head reads the stride-16 map.
# Experiments add pretrained weights (--options model.pretrained=...), the dataset and the schedule;
# see SEG/README.md.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ConvMAE',  # published name of ConvViTBackbone (SEG/mmseg_custom/convvit_backbone.py)
        img_size=[512, 128, 64],  # published form: the input size of each patch-embedding stage
        patch_size=[4, 2, 2],
        embed_dim=[256, 384, 768],
        depth=[2, 2, 11],
        num_heads=12,
        mlp_ratio=[4, 4, 4],
        qkv_bias=True,
        use_abs_pos_emb=True,
        use_rel_pos_bias=True,
        init_values=1.0,
        drop_path_rate=0.2,
        out_indices=[3, 5, 7, 11],  # published; the outputs are the ends of the stages
        norm_cfg=norm_cfg),  # of the stride-32 branch
    decode_head=dict(
        type='UPerHead',
        in_channels=[256, 384, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
