"""FID Inception-v3 feature extractor in plain torch (no torchvision).

The standard FID features are the 2048-d pool3 activations of the Inception-v3
variant that pytorch-fid (mseitzer/pytorch-fid, src/pytorch_fid/inception.py)
builds from torchvision's ``Inception3`` and loads with the TensorFlow-ported
weights ``pt_inception-2015-12-05-6726825d.pth``. torchvision cannot be
installed here, so this module re-implements that network with exactly the
module names and parameter shapes of torchvision's ``Inception3`` layout
(``num_classes=1008``, ``aux_logits=False``), which is the layout of that
checkpoint's state_dict, plus pytorch-fid's FID patches:

* ``Mixed_5b/5c/5d`` (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and
  ``Mixed_7b`` (FIDInceptionE_1) average-pool their pool branch with
  ``count_include_pad=False`` (TensorFlow's average pool ignores the padding);
* ``Mixed_7c`` (FIDInceptionE_2) max-pools its pool branch instead.

`FIDInceptionV3.forward` reproduces pytorch-fid's ``InceptionV3`` with its
defaults (``output_blocks=[3]``, ``resize_input=True``, ``normalize_input=True``):
bilinear resize to 299x299 (``align_corners=False``), scale [0, 1] -> [-1, 1],
the stem, ``Mixed_5b`` .. ``Mixed_7c``, global average pool. The ``fc`` layer
(1008 classes) is kept only so the checkpoint loads with ``strict=True``; FID
does not use it.

Verified here (tests/test_fid.py): state_dict keys and shapes for
representative layers against the torchvision/pytorch-fid source, the total
parameter count (23,850,960, derived from torchvision's documented 27,161,264
for ``inception_v3`` with the aux head and 1000 classes), the pooling patches,
strict save/load round trips, output shape.

NOT verified here: numerical equality of the features (and hence of FID values)
with pytorch-fid on the real weights. The weights file cannot be downloaded in
this environment (no network) and neither pytorch-fid nor torchvision can be
installed, so the forward pass has only been checked structurally, on random
weights. Before relying on absolute FID values, run once with the real
``pt_inception-2015-12-05-6726825d.pth`` next to pytorch-fid and compare the
features (expected: equal to float32 rounding).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FEATURE_DIM",
    "FID_WEIGHTS_FILE",
    "FIDInceptionV3",
    "fid_inception_v3",
    "inception_features",
    "load_fid_state_dict",
]

#: pytorch-fid's weights file (TF inception-2015-12-05 ported to PyTorch).
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: Width of the pool3 features.
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm(eps=0.001) + ReLU, as torchvision's BasicConv2d."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        # The names `conv` and `bn` are part of the checkpoint's keys.
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        # eps=0.001 is TensorFlow's default, which the ported weights were trained with.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class FIDInceptionA(nn.Module):
    """torchvision's InceptionA with pytorch-fid's patch: pool branch avg-pools without counting padding."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # TF's average pool ignores the zero padding in the average (the FID patch).
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """torchvision's InceptionB (grid reduction 35 -> 17; unpatched in FID)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(nn.Module):
    """torchvision's InceptionC with pytorch-fid's patch: pool branch avg-pools without counting padding."""

    def __init__(self, in_channels: int, channels_7x7: int):
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

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b = self.branch7x7dbl_1(x)
        b = self.branch7x7dbl_2(b)
        b = self.branch7x7dbl_3(b)
        b = self.branch7x7dbl_4(b)
        branch7x7dbl = self.branch7x7dbl_5(b)
        # TF's average pool ignores the zero padding in the average (the FID patch).
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """torchvision's InceptionD (grid reduction 17 -> 8; unpatched in FID)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        b = self.branch7x7x3_2(b)
        b = self.branch7x7x3_3(b)
        branch7x7x3 = self.branch7x7x3_4(b)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class FIDInceptionE(nn.Module):
    """torchvision's InceptionE with pytorch-fid's patches.

    ``pool="avg"`` is FIDInceptionE_1 (Mixed_7b: average pool without counting
    padding); ``pool="max"`` is FIDInceptionE_2 (Mixed_7c: max pool; pytorch-fid
    notes this is likely a bug in the TF graph, but it is what the FID weights
    and every published FID value use).
    """

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        b = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1)
        if self.pool == "avg":
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3: images (n, 3, H, W) in [0, 1] -> pool3 features (n, 2048).

    Attribute names and order follow torchvision's ``Inception3`` so that the
    state_dict matches ``pt_inception-2015-12-05-6726825d.pth`` key for key.
    """

    def __init__(self):
        super().__init__()
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
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        # Unused by the features; present because the checkpoint has it (1008
        # classes: the TF 2015 graph's label set) and the load is strict.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (n, 3, H, W), got shape {tuple(x.shape)}")
        # Same order as pytorch-fid: resize first, then rescale.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


def _mismatch_message(expected: Mapping, given: Mapping, limit: int = 5) -> str | None:
    """Human-readable key/shape differences between two state_dicts, or None if they match."""
    # num_batches_tracked may be absent from checkpoints written before
    # PyTorch 0.4.1; BatchNorm's loader fills it in, so it is not an error.
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected
              if k in given and tuple(getattr(given[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {items[:limit]}{more}")
    return "; ".join(parts) or None


def load_fid_state_dict(module: FIDInceptionV3, state_dict: Mapping, source: str = "state_dict") -> None:
    """Load a state_dict strictly, raising ValueError that names the first few mismatches.

    torch's own strict-load RuntimeError lists every key, hundreds for a wrong
    checkpoint, which buries the cause; this names the first few of each kind.
    """
    if not isinstance(state_dict, Mapping):
        # ValueError, not TypeError: usually a checkpoint file's content, like the key errors.
        raise ValueError(  # noqa: TRY004
            f"{source}: expected a state_dict (mapping of name -> tensor), "
            f"got {type(state_dict).__name__}")
    expected = module.state_dict()
    msg = _mismatch_message(expected, state_dict)
    if msg:
        raise ValueError(f"{source} does not fit the FID Inception-v3 layout "
                         f"(pytorch-fid's {FID_WEIGHTS_FILE} expected): {msg}")
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # anything the key/shape check above did not foresee
        raise ValueError(f"{source} does not fit the FID Inception-v3 layout: {e}") from e


def fid_inception_v3(weights_path: str | None = None, device="cpu") -> torch.nn.Module:
    """The FID Inception-v3 mapping images (n, 3, H, W) in [0, 1] to (n, 2048) pool3 features.

    ``weights_path``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
    (a plain state_dict), loaded with ``strict=True``; ValueError naming the
    first few missing/unexpected keys or shape mismatches if it does not fit.
    ``None`` leaves PyTorch's default random initialisation (tests only: random
    features make FID values meaningless).

    Returned in eval mode (BatchNorm uses the stored running statistics) with
    gradients off.
    """
    module = FIDInceptionV3()
    if weights_path is not None:
        # weights_only: a .pth is a pickle; never execute code from a downloaded file.
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
        load_fid_state_dict(module, state_dict, source=str(weights_path))
    module.eval()
    module.requires_grad_(False)
    return module.to(device)


def inception_features(module: torch.nn.Module, images: np.ndarray, batch_size: int = 64,
                       device="cpu") -> np.ndarray:
    """Pool3 features (n, 2048), float64, of images (n, 3, H, W).

    ``images``: float in [0, 1] (as pytorch-fid's ``ToTensor`` yields), or
    uint8 in [0, 255] (divided by 255, as ``ToTensor`` does). Float input
    outside [0, 1] is rejected: [-1, 1] or [0, 255] floats would silently give
    wrong features. Channels must come first; transpose (n, H, W, 3) arrays.

    Batches run in float32 under ``torch.inference_mode`` with the module in
    eval mode; ``module`` is moved to ``device``. float64 output so that
    `modeaudit.tasks.metrics.fid.StreamingStats` accumulates without another cast.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (n, 3, H, W), got shape {images.shape}"
                         + (" (channels last? transpose to (n, 3, H, W))"
                            if images.ndim == 4 and images.shape[-1] == 3 else ""))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    scale = None
    if images.dtype == np.uint8:
        scale = 255.0
    elif not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")
    elif images.size:
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"float images must lie in [0, 1], got range [{lo}, {hi}]")

    module.to(device)
    module.eval()
    out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            x = torch.as_tensor(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32)
            if scale is not None:
                x = x / scale
            feats = module(x)
            if feats.shape != (chunk.shape[0], FEATURE_DIM):
                raise ValueError(f"module returned shape {tuple(feats.shape)}, "
                                 f"expected ({chunk.shape[0]}, {FEATURE_DIM})")
            out[start:start + chunk.shape[0]] = feats.double().cpu().numpy()
    return out
