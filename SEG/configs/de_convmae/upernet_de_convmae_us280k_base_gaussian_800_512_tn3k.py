# UPerNet + ConvViT-B from Deblurring ConvMAE (US-280K, 800 epochs), fine-tuned at 512 on TN3K with
# Gaussian-blurred images (sigma 1.1, as in pretraining). Values as published; pass the pretrained
# weights with --options model.pretrained=/path/to/checkpoint (see SEG/README.md).
_base_ = ['../_base_/upernet_convvit_base_512_160k.py', '../_base_/datasets/tn3k_gaussian.py']

# published: 10 images per GPU (8 GPUs)
train_dataloader = dict(batch_size=10)
