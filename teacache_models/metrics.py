"""Image-quality metrics against a reference: PSNR and SSIM, per image, in plain PyTorch.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over the
window positions that fit inside the image (the reference implementation's 'valid' filtering), averaged
over positions and channels. Both metrics compute in float64.
"""

from __future__ import annotations

import torch

__all__ = ["psnr", "ssim"]


def _check_pair(images: torch.Tensor, reference: torch.Tensor, data_range: float) -> None:
    for name, value in (("images", images), ("reference", reference)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., H, W), got shape {tuple(value.shape)}")
    if images.shape != reference.shape:
        raise ValueError(
            f"images and reference must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}"
        )
    if isinstance(data_range, bool) or not isinstance(data_range, int | float) or not data_range > 0:
        raise ValueError(f"data_range must be a number > 0 (max - min of the pixel scale), got {data_range!r}")


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float, channel_dims: int = 1) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image against its reference.

    Args:
        images, reference: (N, *image) tensors of the same shape; `image` is the last `channel_dims + 2`
            dimensions, e.g. (C, H, W) with `channel_dims=1`.
        data_range: max - min of the pixel scale (2 for [-1, 1], 255 for uint8 values).
        channel_dims: how many dimensions before (H, W) belong to one image.

    Returns:
        (N,) float64 PSNR; `inf` where an image equals its reference.
    """
    _check_pair(images, reference, data_range)
    image_dims = channel_dims + 2
    if images.ndim < image_dims:
        raise ValueError(f"images must have at least {image_dims} dimensions, got shape {tuple(images.shape)}")
    difference = images.double() - reference.double()
    mse = difference.square().flatten(-image_dims).mean(dim=-1).flatten()  # (N,)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    images: torch.Tensor,
    reference: torch.Tensor,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity of each image against its reference (1 for identical images).

    Args:
        images, reference: (N, C, H, W) or (N, H, W) tensors of the same shape; H and W must be at least
            `window_size`.
        data_range: max - min of the pixel scale (2 for [-1, 1], 255 for uint8 values).
        window_size, sigma: the Gaussian window (11 and 1.5 in the paper).
        k1, k2: the stabilising constants (0.01 and 0.03 in the paper).

    Returns:
        (N,) float64 SSIM, averaged over window positions and channels.
    """
    _check_pair(images, reference, data_range)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
    if min(images.shape[-2:]) < window_size:
        raise ValueError(
            f"images of {tuple(images.shape[-2:])} pixels are smaller than the {window_size}x{window_size} window; "
            "pass a smaller window_size"
        )
    x = images.double().reshape(-1, 1, *images.shape[-2:])  # (N * C, 1, H, W)
    y = reference.double().reshape(-1, 1, *images.shape[-2:])
    window_1d = _gaussian_window(window_size, sigma)
    window = (window_1d[:, None] * window_1d[None, :])[None, None]  # (1, 1, k, k)

    def local_mean(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(tensor, window)  # (N * C, 1, H - k + 1, W - k + 1)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    covariance = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(images.shape[0], -1).mean(dim=1)
