# TNUI thyroid-nodule segmentation, original images; same layout and pipelines as TN3K.
_base_ = ['./tn3k.py']
data_root = 'data/tnui'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
