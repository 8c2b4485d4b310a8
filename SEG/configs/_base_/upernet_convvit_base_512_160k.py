# UPerNet + ConvViT-B at 512x512 with the published fine-tuning recipe: the part the four published
# experiment configs (ConvMAE / Deblurring ConvMAE x TN3K / TNUI) share. Each experiment adds its
# dataset and batch size. The schedule (1500 warm-up iterations, then poly to 0 at 160k) is in
# schedules/schedule_160k.py.
_base_ = ['./models/upernet.py', './default_runtime.py', './schedules/schedule_160k.py']
# (no top-level crop_size here: the dataset bases define it, and mmengine refuses a key twice)
data_preprocessor = dict(size=(512, 512))
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
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))

# AdamW, layer decay 0.75 over the 11 transformer blocks (13 levels: stages 1-2 and embeddings,
# blocks3.0 ... blocks3.10, heads).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(num_layers=11, layer_decay_rate=0.75))
