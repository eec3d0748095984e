"""Video classifiers in plain torch, so training never needs torchvision.

Every model maps a normalised clip batch (B, 3, T, H, W) float to logits (B, num_classes), for any
T >= 1 and frame sizes such as 112 or 64. The 3D models accept
`model.to(memory_format=torch.channels_last_3d)`; all accept bf16 autocast.

The ResNets use torchvision's module names as well as its layer shapes, so a torchvision state_dict
(for example Kinetics-400 weights) loads into them with `load_state_dict` and no key mapping.

- `r3d18`: 3D ResNet-18 (Tran et al. 2018), 33,371,472 parameters at 400 classes.
- `r2plus1d18`: R(2+1)D-18, 31,505,325 parameters at 400 classes.
- `cnn-lstm`: a 2D ResNet-18 run on every frame, its 512-d features into a 1-layer LSTM (hidden
  512); the classifier reads the LSTM's final hidden state, the only one that has seen the whole
  clip (a mean over time would give equal weight to early states that saw one or two frames). The
  CNN (`model.cnn`) uses torchvision's resnet18 names, so ImageNet weights load into it with
  `strict=False` (which skips their `fc`). Its convs are 2D: it takes `torch.channels_last`; asking
  for `channels_last_3d` raises in torch ("required rank 5 tensor").
- `tiny`: a three-conv 3D CNN for CPU smoke runs, 59,187 parameters at 51 classes.
- `torchvision:<name>`: any torchvision video model (`r3d_18`, `mvit_v2_s`, ...), untrained; needs
  torchvision installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import UserError

MODEL_NAMES: tuple[str, ...] = ("r3d18", "r2plus1d18", "cnn-lstm", "tiny")

TORCHVISION_PREFIX = "torchvision:"


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model named `name` (one of MODEL_NAMES or 'torchvision:<name>').

    The model maps (B, 3, T, H, W) float32 (or bf16 under autocast) to logits (B, num_classes).
    Weights are drawn from torch's global RNG: seed it first for a reproducible init.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes!r}")
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX) :], num_classes)
    if name == "r3d18":
        model = _VideoResNet(_r3d_stem, _conv3x3x3, num_classes)
    elif name == "r2plus1d18":
        model = _VideoResNet(_r2plus1d_stem, _conv2plus1d, num_classes)
    elif name == "cnn-lstm":
        model = _CNNLSTM(num_classes)
    elif name == "tiny":
        model = _Tiny(num_classes)
    else:
        choices = ", ".join((*MODEL_NAMES, TORCHVISION_PREFIX + "<name>"))
        raise UserError(f"unknown model '{name}'; choose from {choices}")
    _init_weights(model)
    return model


def _torchvision_model(arch: str, num_classes: int) -> nn.Module:
    try:
        # Imported here only: torchvision is optional and the built-in models must never need it.
        import torchvision
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        raise UserError(f"model '{TORCHVISION_PREFIX}{arch}' needs torchvision, which is not installed") from None
    video = torchvision.models.list_models(module=torchvision.models.video)
    if arch not in video:
        raise UserError(f"unknown torchvision video model '{arch}'; choose from {', '.join(sorted(video))}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _init_weights(model: nn.Module) -> None:
    # torchvision's init for its video ResNets; it is what the published recipes trained from.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ---- 3D ResNets (r3d18, r2plus1d18) ----------------------------------------------------------

# (in_planes, out_planes, mid_planes, stride) -> conv; mid_planes is used by (2+1)D convs only.
_ConvBuilder = Callable[[int, int, int, int], nn.Module]


def _conv3x3x3(in_planes: int, out_planes: int, mid_planes: int, stride: int) -> nn.Module:
    return nn.Conv3d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv2plus1d(in_planes: int, out_planes: int, mid_planes: int, stride: int) -> nn.Module:
    # Spatial then temporal, with BN+ReLU between: the extra nonlinearity is the point of (2+1)D.
    return nn.Sequential(
        nn.Conv3d(in_planes, mid_planes, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
        nn.BatchNorm3d(mid_planes),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid_planes, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
    )


def _r3d_stem() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
        nn.BatchNorm3d(64),
        nn.ReLU(inplace=True),
    )


def _r2plus1d_stem() -> nn.Module:
    # 45 = the (2+1)D width that matches a (3, 7, 7) conv's parameter count, as in the paper.
    return nn.Sequential(
        nn.Conv3d(3, 45, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
        nn.BatchNorm3d(45),
        nn.ReLU(inplace=True),
        nn.Conv3d(45, 64, (3, 1, 1), 1, (1, 0, 0), bias=False),
        nn.BatchNorm3d(64),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    def __init__(self, conv: _ConvBuilder, in_planes: int, planes: int, stride: int):
        super().__init__()
        # Width of the (2+1)D intermediate, matching a full 3x3x3 conv's parameter count. Like
        # torchvision, it is computed once from the block's input width and used by both convs,
        # which keeps parameter counts and state_dict shapes identical to torchvision's.
        mid = (in_planes * planes * 27) // (in_planes * 9 + 3 * planes)
        self.conv1 = nn.Sequential(conv(in_planes, planes, mid, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv(planes, planes, mid, 1), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm3d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class _VideoResNet(nn.Module):
    def __init__(self, stem: Callable[[], nn.Module], conv: _ConvBuilder, num_classes: int):
        super().__init__()
        self.stem = stem()
        widths = (64, 128, 256, 512)
        in_planes = 64
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            blocks = nn.Sequential(_BasicBlock(conv, in_planes, planes, stride), _BasicBlock(conv, planes, planes, 1))
            self.add_module(f"layer{i}", blocks)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


# ---- cnn-lstm --------------------------------------------------------------------------------


class _BasicBlock2d(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class _ResNet18Features(nn.Module):
    """Image ResNet-18 without its classifier: (N, 3, H, W) -> (N, 512)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for i, planes in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            blocks = nn.Sequential(_BasicBlock2d(in_planes, planes, stride), _BasicBlock2d(planes, planes, 1))
            self.add_module(f"layer{i}", blocks)
            in_planes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class _CNNLSTM(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.cnn = _ResNet18Features()
        self.lstm = nn.LSTM(512, 512, num_layers=1, batch_first=True)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        # Frames of all clips go through the CNN as one batch: one big conv call, not T small ones.
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        features = self.cnn(frames).view(b, t, -1)
        _, (h_n, _) = self.lstm(features)
        return self.fc(h_n[-1])


# ---- tiny ------------------------------------------------------------------------------------


def _conv_bn_relu(in_planes: int, out_planes: int, kernel, stride, padding) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_planes, out_planes, kernel, stride, padding, bias=False),
        nn.BatchNorm3d(out_planes),
        nn.ReLU(inplace=True),
    )


class _Tiny(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        # The stem strides 4x in space with no temporal extent: at 112x112 it is the costliest
        # layer, and this keeps a (8, 3, 16, 112, 112) training step far under a second on one core.
        self.features = nn.Sequential(
            _conv_bn_relu(3, 16, (1, 5, 5), (1, 4, 4), (0, 2, 2)),
            _conv_bn_relu(16, 32, 3, (1, 2, 2), 1),
            _conv_bn_relu(32, 48, 3, 2, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))
