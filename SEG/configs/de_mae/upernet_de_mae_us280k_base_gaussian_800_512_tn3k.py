# UPerNet + ViT-B from Deblurring MAE (US-280K), fine-tuned at 512 on TN3K with Gaussian-blurred
# images. Not a published configuration (the published segmentation results are ConvMAE-only): the
# ViT recipe of mmseg's MAE configs — block outputs 3/5/7/11 turned into strides 4/8/16/32 by
# Feature2Pyramid — with the same data, schedule and optimizer as the ConvMAE experiments.
_base_ = [
    '../_base_/models/upernet_vit.py', '../_base_/datasets/tn3k_gaussian.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]

# layer decay over the 12 transformer blocks of ViT-B (14 levels: embeddings, blocks.0 ... blocks.11,
# neck and heads)
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))

train_dataloader = dict(batch_size=10)
