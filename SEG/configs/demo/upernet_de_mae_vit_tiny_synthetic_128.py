# `make demo` (tools/demo.py): UPerNet + tiny ViT from a tiny Deblurring MAE, fine-tuned on the
# 128x128 synthetic thyroid images of tools/synthetic_us.py (blurred copy in images_gaussian/).
# It inherits the full-size Deblurring MAE experiment and changes only what a CPU run of about a
# minute needs. Not a recipe for real data.
_base_ = ['../de_mae/upernet_de_mae_us280k_base_gaussian_800_512_tn3k.py']
crop_size = (128, 128)
# Nodules cover ~3 % of these images; with the unweighted loss a 300-iteration run stays at the
# all-background solution, so the nodule class is weighted x5 in both heads.
nodule_weighted_ce = dict(type='CrossEntropyLoss', use_sigmoid=False, class_weight=[1.0, 5.0])
model = dict(
    data_preprocessor=dict(size=crop_size),
    # a 2-block encoder has no blocks 3/5/7/11: its two block outputs feed the 4-level pyramid
    backbone=dict(arch='tiny_patch16', img_size=128, out_indices=[0, 1, 1, 1], drop_path_rate=0.0),
    neck=dict(embed_dim=96),
    decode_head=dict(in_channels=[96, 96, 96, 96], channels=64,
                     loss_decode=dict(**nodule_weighted_ce, loss_weight=1.0)),
    auxiliary_head=dict(in_channels=96, channels=32,
                        loss_decode=dict(**nodule_weighted_ce, loss_weight=0.4)),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(85, 85)))
optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(num_layers=2))

# Upscaling only (ratio >= 1): the 128x128 synthetic images give full 128x128 crops. Crops of
# images of other shapes are padded with ignored pixels (label 255), which the class-weighted loss
# leaves out (SEG/mmseg_custom/losses.py).
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(128, 128), ratio_range=(1.0, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
# 2 CPU cores: loading in the main process beats starting worker processes for a short run
loader = dict(num_workers=0, persistent_workers=False)
train_dataloader = dict(batch_size=8, **loader, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(**loader, dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(**loader, dataset=dict(pipeline=test_pipeline))

max_iters = 300
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=50),
                     checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
