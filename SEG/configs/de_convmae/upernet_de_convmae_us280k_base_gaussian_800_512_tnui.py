# UPerNet + ConvViT-B from Deblurring ConvMAE (US-280K, 800 epochs), fine-tuned at 512 on TNUI with
# Gaussian-blurred images (sigma 1.1, as in pretraining). Values as published; pass the pretrained
# weights with --options model.pretrained=/path/to/checkpoint (see SEG/README.md).
_base_ = [
    '../_base_/models/upernet_convvit.py', '../_base_/datasets/tnui_gaussian.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]

# layer decay over the 11 transformer blocks of ConvViT-B (13 levels: stages 1-2 and embeddings,
# blocks3.0 ... blocks3.10, heads)
optim_wrapper = dict(paramwise_cfg=dict(num_layers=11))

# published: 10 images per GPU (8 GPUs)
train_dataloader = dict(batch_size=10)
