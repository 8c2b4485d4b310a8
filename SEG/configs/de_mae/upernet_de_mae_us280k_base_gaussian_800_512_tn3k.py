# UPerNet + ViT-B from Deblurring MAE (US-280K), fine-tuned at 512 on TN3K with Gaussian-blurred
# images. Not a published configuration (the published segmentation results are ConvMAE-only): the
# ViT recipe of mmseg's MAE configs — block outputs 3/5/7/11 turned into strides 4/8/16/32 by
# Feature2Pyramid — with the same data, schedule and optimizer as the ConvMAE experiments.
_base_ = [
    '../_base_/models/upernet.py', '../_base_/datasets/tn3k_gaussian.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ViTBackbone',
        arch='base_patch16',
        img_size=512,
        out_indices=[3, 5, 7, 11],
        drop_path_rate=0.1),
    neck=dict(type='Feature2Pyramid', embed_dim=768, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(in_channels=[768, 768, 768, 768], num_classes=2, channels=768),
    auxiliary_head=dict(in_channels=768, num_classes=2),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(num_layers=12, layer_decay_rate=0.75))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
train_dataloader = dict(batch_size=10)
