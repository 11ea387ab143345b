"""Plain reference implementations: what a careful user writes without osteolib, from torch, timm, torchvision,
PIL and pytorch-grad-cam alone (nothing here imports osteolib).

- :mod:`~bench.reference.loop`: a training loop in the official MAE recipe's shape (AdamW betas (0.9, 0.95),
  weight decay 0.05 off norms and biases, per-step cosine learning rate), fp32;
- :mod:`~bench.reference.images`: PNG files decoded by PIL in a torch Dataset, torchvision transforms, a DataLoader;
- :mod:`~bench.reference.mae`: the official MAE model (``models_mae.py``'s shape) at ViT-S/16 with osteolib's
  decoder size; :mod:`~bench.reference.simmim`: SimMIM on timm's DenseNet121;
- :mod:`~bench.reference.gradcam`: pytorch-grad-cam called one image at a time, as its tutorials do;
- :mod:`~bench.reference.decode`: a PIL decode-and-resize loop.
"""
