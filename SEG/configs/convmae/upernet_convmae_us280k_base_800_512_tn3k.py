# UPerNet + ConvViT-B from (vanilla) ConvMAE (US-280K, 800 epochs), fine-tuned at 512 on TN3K with
# the original images. Values as published; pass the pretrained
# weights with --options model.pretrained=/path/to/checkpoint (see SEG/README.md).
_base_ = ['../_base_/upernet_convvit_base_512_160k.py', '../_base_/datasets/tn3k.py']

# published: 6 images per GPU (8 GPUs)
train_dataloader = dict(batch_size=6)
