"""The Attention-Res-V-Net: a residual 3D U/V-Net with attention-gated skip connections.

Architecture (after the seed study): an encoder of residual blocks (batch norm, LeakyReLU,
grouped 3x3x3 convolutions) with learned (strided-convolution) downsampling, a bottleneck, and a
decoder whose transposed-convolution upsampling is concatenated with the encoder's skip
features after an additive attention gate (Oktay et al. 2018, "Attention U-Net"). Downsampling
is in-plane only, ``(2, 2, 1)``, at the top two levels because axial slices are thick, and
``(2, 2, 2)`` below.

Tensors are ``(batch, channel, x, y, z)`` with z the slice axis. The spatial size of an input
must be a multiple of :func:`network_divisor` along each axis.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

from legcomp.errors import LegcompInputError

CONFIGS: dict[str, dict[str, Any]] = {
    # The seed study's network: features 64-128-256-512, bottleneck 1024.
    "seed": {
        "features": [64, 128, 256, 512],
        "bottleneck": 1024,
        "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        "groups": 8,
        "negative_slope": 0.01,
        "dropout": 0.0,
    },
    # legcomp's default: same topology, 1/8 of the width, bottleneck 128, and plain (ungrouped)
    # convolutions, which run about twice as fast as grouped ones on a CPU at this width
    # (measured with bench/bench_network.py; 1.8 M parameters, 3.6 MB as float16 weights).
    "fast": {
        "features": [8, 16, 32, 64],
        "bottleneck": 128,
        "strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
        "groups": 1,
        "negative_slope": 0.01,
        "dropout": 0.0,
    },
    # A very small network for tests and smoke runs.
    "tiny": {
        "features": [4, 8],
        "bottleneck": 8,
        "strides": [[2, 2, 1], [2, 2, 2]],
        "groups": 2,
        "negative_slope": 0.01,
        "dropout": 0.0,
    },
}
"""Named network configurations (see :func:`resolve_config`)."""

_KEYS = {"features", "bottleneck", "strides", "groups", "negative_slope", "dropout"}


def resolve_config(config: str | dict[str, Any] = "fast") -> dict[str, Any]:
    """Return a complete, validated configuration dict (a copy) from a name or a dict.

    A dict may be partial: missing keys are taken from ``config["base"]`` (default ``"fast"``).
    The result holds ``features`` (channels per level), ``bottleneck`` (channels), ``strides``
    (one (sx, sy, sz) per level), ``groups`` (of the grouped convolutions), ``negative_slope``
    (LeakyReLU) and ``dropout``, plus ``name``.
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise LegcompInputError(f"unknown network config {config!r}; expected one of {', '.join(CONFIGS)}")
        out = copy.deepcopy(CONFIGS[config])
        out["name"] = config
    elif isinstance(config, dict):
        base = config.get("base", config.get("name", "fast"))
        out = copy.deepcopy(CONFIGS.get(base, CONFIGS["fast"]))
        out.update({k: copy.deepcopy(v) for k, v in config.items() if k != "base"})
        out.setdefault("name", "custom")
        unknown = set(out) - _KEYS - {"name"}
        if unknown:
            raise LegcompInputError(f"unknown network config keys: {', '.join(sorted(unknown))}")
    else:
        raise LegcompInputError(f"network config must be a name or a dict, not {type(config).__name__}")
    out["features"] = [int(f) for f in out["features"]]
    out["bottleneck"] = int(out["bottleneck"])
    out["strides"] = [[int(s) for s in st] for st in out["strides"]]
    out["groups"] = int(out["groups"])
    if len(out["strides"]) != len(out["features"]) or not out["features"]:
        raise LegcompInputError("network config needs one stride per level (len(strides) == len(features) >= 1)")
    if any(len(s) != 3 or min(s) < 1 for s in out["strides"]):
        raise LegcompInputError("each network stride must be three positive integers (x, y, z)")
    return out


def network_divisor(config: str | dict[str, Any] = "fast") -> tuple[int, int, int]:
    """Total downsampling factor (dx, dy, dz): input sizes must be multiples of it.

    For the named configs ``seed`` and ``fast`` it is (16, 16, 4).
    """
    cfg = resolve_config(config)
    return tuple(int(math.prod(s[i] for s in cfg["strides"])) for i in range(3))  # type: ignore[return-value]


def _groups(channels_in: int, channels_out: int, groups: int) -> int:
    """Largest divisor of ``groups`` that divides both channel counts."""
    g = max(1, groups)
    while g > 1 and (channels_in % g or channels_out % g):
        g -= 1
    return g


class ResBlock(nn.Module):
    """Residual block: conv3 (full) -> BN -> LeakyReLU -> grouped conv3 -> BN, + shortcut, LeakyReLU.

    The first convolution mixes all channels; the second is grouped. The shortcut is a 1x1x1
    convolution when the channel count changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, negative_slope: float = 0.01,
                 dropout: float = 0.0):
        super().__init__()
        act = ("leakyrelu", {"negative_slope": negative_slope, "inplace": True})
        self.conv1 = Convolution(3, in_channels, out_channels, kernel_size=3, act=act, norm="batch",
                                 dropout=dropout or None, bias=False)
        self.conv2 = Convolution(3, out_channels, out_channels, kernel_size=3, act=None, norm="batch",
                                 groups=_groups(out_channels, out_channels, groups), bias=False)
        self.shortcut: nn.Module = (nn.Identity() if in_channels == out_channels else
                                    Convolution(3, in_channels, out_channels, kernel_size=1, conv_only=True, bias=False))
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class AttentionResVNet(nn.Module):
    """Residual 3D V-Net with attention gates on the skip connections.

    Args:
        in_channels: input channels (2: water+fat for stage 1, opposed-phase+water for stage 2).
        out_channels: classes, background included.
        features: channels of each encoder level (top first).
        bottleneck: channels of the bottleneck.
        strides: downsampling (sx, sy, sz) below each level.
        groups: groups of the grouped convolutions.
        negative_slope: LeakyReLU slope.
        dropout: dropout probability in the residual blocks.

    Input ``(B, in_channels, X, Y, Z)`` with X, Y, Z multiples of the product of ``strides``;
    output logits ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 3, *, features: Sequence[int] = (16, 32, 64, 128),
                 bottleneck: int = 256, strides: Sequence[Sequence[int]] = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
                 groups: int = 4, negative_slope: float = 0.01, dropout: float = 0.0):
        super().__init__()
        act = ("leakyrelu", {"negative_slope": negative_slope, "inplace": True})
        feats = [int(f) for f in features]
        self.divisor = tuple(int(math.prod(s[i] for s in strides)) for i in range(3))
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = in_channels
        for i, f in enumerate(feats):
            self.encoders.append(ResBlock(ch, f, groups, negative_slope, dropout))
            nxt = feats[i + 1] if i + 1 < len(feats) else bottleneck
            st = tuple(int(s) for s in strides[i])
            self.downs.append(Convolution(3, f, nxt, strides=st, kernel_size=st, padding=0, act=act, norm="batch",
                                          bias=False))
            ch = nxt
        self.bottleneck = ResBlock(bottleneck, bottleneck, groups, negative_slope, dropout)
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        ch = bottleneck
        for i in reversed(range(len(feats))):
            f = feats[i]
            st = tuple(int(s) for s in strides[i])
            self.ups.append(UpSample(3, ch, f, scale_factor=st, kernel_size=st, mode="deconv", bias=False))
            self.gates.append(AttentionBlock(3, f_int=max(1, f // 2), f_g=f, f_l=f))
            self.decoders.append(ResBlock(2 * f, f, groups, negative_slope, dropout))
            ch = f
        self.head = Convolution(3, feats[0], out_channels, kernel_size=1, conv_only=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [n for n, d in zip(x.shape[2:], self.divisor) if n % d]
        if bad:
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} is not a multiple of {self.divisor}")
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, gate, dec, skip in zip(self.ups, self.gates, self.decoders, reversed(skips)):
            g = up(x)
            x = dec(torch.cat([gate(g=g, x=skip), g], dim=1))
        return self.head(x)


def build_network(config: str | dict[str, Any] = "fast", in_channels: int = 2, out_channels: int = 3) -> AttentionResVNet:
    """Build an :class:`AttentionResVNet` from a named config (``"fast"``, ``"seed"``, ``"tiny"``) or a dict."""
    cfg = resolve_config(config)
    return AttentionResVNet(in_channels, out_channels, features=cfg["features"], bottleneck=cfg["bottleneck"],
                            strides=cfg["strides"], groups=cfg["groups"], negative_slope=cfg["negative_slope"],
                            dropout=cfg["dropout"])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
