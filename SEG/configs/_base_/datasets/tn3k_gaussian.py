# TN3K for the deblurring arm: the same masks, images blurred like the pretraining input
# (images_gaussian/, made with blurred_images.py --method gaussian --sigma 1.1; see SEG/README.md).
_base_ = ['./tn3k.py']
train_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/train')))
val_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/val')))
test_dataloader = dict(dataset=dict(data_prefix=dict(img_path='images_gaussian/test')))
