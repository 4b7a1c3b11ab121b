"""Lung segmentation: the Attention U-Net, its Focal Tversky loss, training and inference."""
