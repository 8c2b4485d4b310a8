# TNUI for the deblurring arm: images_gaussian/ (see tn3k_gaussian.py) and the same masks.
_base_ = ['./tnui.py']
train_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/train')))
val_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/val')))
test_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/test')))
