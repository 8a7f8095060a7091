"""Models: the paper's 24-convolution U-Net (and, later, the threshold baseline)."""

from ichseg.models.unet import UNet

__all__ = ["UNet"]
