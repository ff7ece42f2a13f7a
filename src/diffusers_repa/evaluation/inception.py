"""The FID Inception v3 network (TensorFlow "2015-12-05" graph) as used by ADM's evaluator, in PyTorch.

The architecture is written here (no torchvision): it is torchvision's Inception v3 with the three changes the
TensorFlow graph has — average pools that ignore the zero padding (``count_include_pad=False``) in the A, C and first
E blocks, a *max* pool in the pooling branch of the last E block, and a 1008-way classifier. Its parameter names follow
the pytorch-fid / torch-fidelity port (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
``fc.weight``, ...), so ``pt_inception-2015-12-05-6726825d.pth`` loads as is.

The three outputs mirror the tensors ADM's ``evaluations/evaluator.py`` reads from the TensorFlow graph:

- ``pool`` (N, 2048): ``pool_3:0``, input of FID, precision and recall;
- ``spatial`` (N, 2023): ``mixed_6/conv:0[..., :7]``, input of sFID. In the TF graph ``mixed`` .. ``mixed_10`` are
  Mixed_5b .. Mixed_7c, so ``mixed_6`` is **Mixed_6d** and ``mixed_6/conv`` is the ReLU output of its 1×1 branch
  (``Mixed_6d.branch1x1``, 192 channels at 17×17). The first 7 channels are flattened in TensorFlow's NHWC order
  (17·17·7 = 2023), which is the layout of ``mu_s``/``sigma_s`` in ADM's reference batches;
- ``logits`` (N, 1008): ``pool @ fc.weight.T`` *without* the bias, as ADM's Inception Score takes the
  ``softmax/logits/MatMul`` tensor (torch-fidelity calls these ``logits_unbiased``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

FID_INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_INCEPTION_WEIGHTS_FILENAME
)
# The first eight hex digits of the file's SHA-256 (the torch.hub naming convention).
FID_INCEPTION_WEIGHTS_HASH_PREFIX = "6726825d"
INCEPTION_WEIGHTS_ENV = "DIFFUSERS_REPA_INCEPTION_WEIGHTS"

INCEPTION_INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
LOGITS_DIM = 1008

ResizeConvention = Literal["tensorflow", "pytorch_fid"]


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3 as in TensorFlow) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's SAME-padded average pool divides by the number of real (non-padding) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 35×35 block with 1×1, 5×5, double 3×3 and pooling branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35×35 → 17×17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: 17×17 block with factorised 7×7 branches."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17×17 → 8×8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """Mixed_7b / Mixed_7c: 8×8 block with expanded 1×3 / 3×1 branches.

    The TensorFlow graph pools with an average (padding excluded) in Mixed_7b and with a *max* in Mixed_7c
    (``pool_with_max=True``), unlike the Inception v3 paper; the FID weights were trained with exactly that graph.
    """

    def __init__(self, in_channels: int, pool_with_max: bool) -> None:
        super().__init__()
        self.pool_with_max = pool_with_max
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.pool_with_max:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], dim=1)


@dataclass
class InceptionFeatures(BaseOutput):
    """Outputs of [`FIDInceptionV3`].

    Args:
        pool (`torch.Tensor` of shape `(N, 2048)`): final average pool (``pool_3``), for FID / precision / recall.
        spatial (`torch.Tensor` of shape `(N, 2023)`): first 7 channels of ``mixed_6/conv`` (Mixed_6d.branch1x1)
            flattened in NHWC order, for sFID.
        logits (`torch.Tensor` of shape `(N, 1008)`): ``pool @ fc.weight.T`` (no bias), for the Inception Score.
    """

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``ResizeBilinear`` with ``align_corners=False`` (the legacy, non half-pixel mapping).

    Output pixel ``i`` samples the input at ``i · in_size / size`` (no ``+0.5`` offsets); neighbours beyond the last
    row/column are clamped. This is the resize inside the graph ADM's evaluator runs, reproduced the same way as
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``: first along the width, then along the height.

    Args:
        images: float tensor (N, C, H, W).
        size: output height and width.
    """
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(
            f"resize_bilinear_tf1 expects a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
        )

    def source_grid(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.arange(size, dtype=torch.float32, device=images.device) * (in_size / size)
        low = position.long()
        high = (low + 1).clamp(max=in_size - 1)
        return low, high, (position - low.float()).to(images.dtype)

    height, width = images.shape[-2:]
    x_low, x_high, x_frac = source_grid(width)
    y_low, y_high, y_frac = source_grid(height)
    left, right = images[..., x_low], images[..., x_high]
    rows = left + (right - left) * x_frac
    top, bottom = rows[..., y_low, :], rows[..., y_high, :]
    return top + (bottom - top) * y_frac[:, None]


def preprocess_for_inception(images: torch.Tensor, convention: ResizeConvention = "tensorflow") -> torch.Tensor:
    """uint8 images (N, 3, H, W) → float32 (N, 3, 299, 299) network input in about [-1, 1].

    Conventions:
        - ``"tensorflow"`` (default; ADM's evaluator and torch-fidelity, what the paper's numbers use): TF1 legacy
          bilinear resize of the [0, 255] values (see [`resize_bilinear_tf1`]), then ``(x - 128) / 128``.
        - ``"pytorch_fid"``: ``x / 255``, ``F.interpolate(mode="bilinear", align_corners=False)``, then ``2x - 1``.
          The half-pixel-centred resize shifts the sampling grid by ~0.07 px at 256 → 299, so FIDs differ slightly
          from ADM's.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Inception expects uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}; "
            "convert HWC arrays with `torch.from_numpy(array).permute(0, 3, 1, 2)`."
        )
    x = images.float()
    if convention == "tensorflow":
        if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            x = resize_bilinear_tf1(x, INCEPTION_INPUT_SIZE)
        return (x - 128.0) / 128.0
    if convention == "pytorch_fid":
        x = F.interpolate(
            x / 255.0, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        return 2.0 * x - 1.0
    raise ValueError(f"Unknown resize convention {convention!r}; use 'tensorflow' (ADM) or 'pytorch_fid'.")


class FIDInceptionV3(nn.Module):
    """The FID Inception v3 network; `forward` maps uint8 images (N, 3, H, W) to [`InceptionFeatures`].

    Build it with random weights (tests) or use [`load_fid_inception`] for the real ones.
    """

    def __init__(self, resize_convention: ResizeConvention = "tensorflow") -> None:
        super().__init__()
        self.resize_convention = resize_convention
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool_with_max=False)
        self.Mixed_7c = FIDInceptionE(2048, pool_with_max=True)
        self.fc = nn.Linear(POOL_DIM, LOGITS_DIM)

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        x = preprocess_for_inception(images, self.resize_convention).to(self.fc.weight.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        # ADM's sFID tensor `mixed_6/conv`: the 1×1 branch of Mixed_6d (TF `mixed_6`), computed once more here
        # rather than hooking the block, as its first 7 of 192 channels are all that is needed.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        logits = pool @ self.fc.weight.T
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def _default_weights_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(weights_path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Where the FID Inception weights are, downloading them once into the torch hub cache if needed.

    Order: ``weights_path``; the environment variable ``DIFFUSERS_REPA_INCEPTION_WEIGHTS``; the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``); else a download from pytorch-fid's
    release (skipped when ``download=False`` or ``HF_HUB_OFFLINE`` is set). Raises `FileNotFoundError` naming the file
    and where to put it when none of these works.
    """
    explicit = weights_path if weights_path is not None else os.environ.get(INCEPTION_WEIGHTS_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {path} (from the argument or ${INCEPTION_WEIGHTS_ENV})."
            )
        return path
    cached = _default_weights_cache_path()
    if cached.is_file():
        return cached
    how_to_fix = (
        f"Download {FID_INCEPTION_WEIGHTS_URL} on a machine with internet access and either put it at {cached}, "
        f"pass its path (--inception_weights / weights_path=...), or set ${INCEPTION_WEIGHTS_ENV} to it."
    )
    from huggingface_hub import constants

    if not download or constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"FID Inception weights {FID_INCEPTION_WEIGHTS_FILENAME} are not available offline. {how_to_fix}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file next to the target and moves it into place once the hash prefix checks out.
        torch.hub.download_url_to_file(
            FID_INCEPTION_WEIGHTS_URL, str(cached), hash_prefix=FID_INCEPTION_WEIGHTS_HASH_PREFIX
        )
    except (OSError, RuntimeError) as error:
        raise FileNotFoundError(f"Could not download the FID Inception weights ({error}). {how_to_fix}") from error
    return cached


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or from a ``.pth`` with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{path} does not hold a plain state dict of tensors.")
    return state_dict


def load_fid_inception(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    resize_convention: ResizeConvention = "tensorflow",
) -> FIDInceptionV3:
    """The FID Inception network with the TF 2015-12-05 weights (see [`resolve_inception_weights`]), in eval mode."""
    path = resolve_inception_weights(weights_path)
    model = FIDInceptionV3(resize_convention=resize_convention)
    try:
        model.load_state_dict(load_inception_state_dict(path))
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a FID Inception state dict (expected pytorch-fid's {FID_INCEPTION_WEIGHTS_FILENAME} key "
            f"layout): {error}"
        ) from error
    return model.eval().requires_grad_(False).to(device)
