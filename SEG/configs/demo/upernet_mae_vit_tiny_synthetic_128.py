# `make demo`: the vanilla-MAE and from-scratch arms of the demo segmentation. The same as the
# Deblurring MAE demo config, on the original (sharp) images.
_base_ = ['./upernet_de_mae_vit_tiny_synthetic_128.py']
train_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images/train')))
val_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images/val')))
test_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images/test')))
