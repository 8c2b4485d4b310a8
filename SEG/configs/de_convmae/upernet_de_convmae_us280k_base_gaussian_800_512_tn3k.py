# UPerNet + ConvViT-B from Deblurring ConvMAE (US-280K, 800 epochs), fine-tuned at 512 on TN3K with
# Gaussian-blurred images (sigma 1.1, as in pretraining). Values as published; pass the pretrained
# weights with --options model.pretrained=/path/to/checkpoint (see SEG/README.md).
_base_ = [
    '../_base_/models/upernet.py', '../_base_/datasets/tn3k_gaussian.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='ConvMAE',
        img_size=[512, 128, 64],
        patch_size=[4, 2, 2],
        embed_dim=[256, 384, 768],
        depth=[2, 2, 11],
        num_heads=12,
        mlp_ratio=[4, 4, 4],
        qkv_bias=True,
        use_abs_pos_emb=True,
        use_rel_pos_bias=True,
        init_values=1.,
        drop_path_rate=0.2,
        out_indices=[3, 5, 7, 11]),
    decode_head=dict(in_channels=[256, 384, 768, 768], num_classes=2, channels=768),
    auxiliary_head=dict(in_channels=768, num_classes=2),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# AdamW, layer decay 0.75 over the 11 transformer blocks (13 levels: stages 1-2 and embeddings,
# blocks3.0 ... blocks3.10, heads).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(num_layers=11, layer_decay_rate=0.75))

# poly (power 1) to 0 after 1500 linear warm-up iterations from 1e-6 x lr
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]

# published: 10 images per GPU (8 GPUs)
train_dataloader = dict(batch_size=10)
