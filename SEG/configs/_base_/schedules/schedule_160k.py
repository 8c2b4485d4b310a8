# 160k iterations. The published schedule file said max_iters=1,000,000 (with a checkpoint interval
# of 10,000,000, i.e. never), which no published run reached; 160k is the usual UPerNet schedule
# (see SEG/README.md): 1500 warm-up iterations, then poly decay to 0.

# The published fine-tuning optimizer: AdamW with layer-wise lr decay 0.75 (the heads at full lr,
# each transformer block below them x0.75, embeddings and convolutional stages lowest; see
# SEG/mmseg_custom/layer_decay.py). Experiments add paramwise_cfg.num_layers, the number of
# transformer blocks of their backbone (ConvViT-B 11, ViT-B 12), which the constructor checks.
optimizer = dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
# AmpOptimWrapper: bf16 autocast (fp16 + loss scaling on GPUs without bf16, plain fp32 on CPU:
# SEG/tools adapt it to the machine). No gradient clipping.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    optimizer=optimizer,
    constructor='LayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.75))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=1000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # the latest checkpoint (for --resume) and the best one by mDice on the val split
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=1,
                    save_best='mDice', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'))
