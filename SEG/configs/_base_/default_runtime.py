default_scope = 'mmseg'
# mmseg_compat first: it must patch mmcv before mmseg is imported (SEG/mmseg_compat.py).
custom_imports = dict(imports=['mmseg_compat', 'mmseg_custom'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))  # SEG/tools switch to gloo on machines without a GPU
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
# A fixed seed: the same command repeats (on CPU bit for bit). tools/train.py --seed N changes it,
# --deterministic sets deterministic=True (deterministic algorithms; see SEG/README.md).
randomness = dict(seed=0, deterministic=False)
log_level = 'INFO'
load_from = None
resume = False
