"""The ImageNet ResNet of the reference's image features (scripts/prepro_feats.py, eval.py --image_folder, the
Captioner API): its misc/resnet.py variant of torchvision's ResNet, with the same parameter names, so that the
reference's resnet101.pth / resnet152.pth files (torchvision key names: conv1, bn1, layer1.0.conv1, ...,
layer1.0.downsample.0/1, fc) load as they are. Ours, not torchvision's (its wheel does not import with the pinned
CPU torch).

Two deviations from torchvision, both the reference's (Caffe-style ResNet), written where they act:
  - a bottleneck that changes the resolution strides in its FIRST 1x1 convolution (torchvision: in the 3x3);
  - the stem's max-pool has no padding and rounds up (ceil_mode=True).
`GridFeatures` turns a normalised image into the reference's two features: fc (2048,) = the spatial mean of the
last stage, att (att_size, att_size, 2048) = its adaptive average pool.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from misc.errors import SaticError
from misc.images import default_cnn_weights

# Bottleneck blocks per stage, by model name (the two depths the reference's prepro_feats.py offers).
DEPTHS = {'resnet101': (3, 4, 23, 3), 'resnet152': (3, 8, 36, 3)}
FEATURE_SIZE = 2048  # channels of the last stage (512 * Bottleneck.expansion)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convolutions with batch norm and a residual connection."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        # reference quirk (Caffe-style ResNet): the stride is in the first 1x1 conv, not in the 3x3 (torchvision)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class ResNet(nn.Module):
    """The bottleneck ResNet: stem, four stages (64, 128, 256, 512 planes), ImageNet classifier `fc` (kept so that
    the weight files load strictly; features never use it)."""

    def __init__(self, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # reference quirk (Caffe-style ResNet): no padding, ceil_mode=True (torchvision: padding=1, floor)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        self.layer1 = self._stage(64, layers[0])
        self.layer2 = self._stage(128, layers[1], stride=2)
        self.layer3 = self._stage(256, layers[2], stride=2)
        self.layer4 = self._stage(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _stage(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        stage = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        stage += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def features(self, x):
        """x (B, 3, H, W) normalised images -> the last stage's map (B, 2048, h, w), h = ceil(H/32)-ish."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        """ImageNet logits (B, num_classes)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet(name='resnet101', layers=None):
    """An untrained ResNet by name (DEPTHS); layers: another blocks-per-stage tuple (tests' small variants)."""
    if layers is None:
        if name not in DEPTHS:
            raise SaticError(f"--cnn_model/--model {name!r}: use one of {', '.join(DEPTHS)}")
        layers = DEPTHS[name]
    return ResNet(layers)


def load_resnet(name, path, layers=None):
    """resnet(name) with the ImageNet weights of path (a state_dict in torchvision's key names), in eval mode;
    SaticError (one line) when the file is missing, unreadable or of another network."""
    from misc.run.checkpoint import load_model_state  # (the one reader of weight files: safe loading)
    model = resnet(name, layers)
    if not os.path.isfile(path):
        raise SaticError(f'{name} weights {path}: file not found; put the ImageNet {name}.pth there (the '
                         f"reference's data/imagenet_weights/{name}.pth, torchvision key names; see "
                         'docs/own_images.md), or pass its path (--cnn_weights / --model_root)')
    state = load_model_state(path, f'{name} weights')
    if isinstance(state, dict) and 'state_dict' in state and 'conv1.weight' not in state:
        state = state['state_dict']
    if not isinstance(state, dict):
        raise SaticError(f'{path} is not a state_dict of {name}: use the reference\'s {name}.pth '
                         '(torchvision key names)')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        first = (missing or wrong)[0]
        raise SaticError(f'{path} does not fit {name}: {len(missing)} missing and {len(wrong)} differently shaped '
                         f'weights (first: {first}); pass the {name}.pth of that depth (--cnn_model / --model)')
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return model.eval()


class GridFeatures(nn.Module):
    """A ResNet's last-stage map as the reference's features (its misc/resnet_utils.myResnet)."""

    def __init__(self, cnn, att_size=14):
        super().__init__()
        self.cnn, self.att_size = cnn, att_size

    def forward(self, images):
        """images (B, 3, H, W) normalised, all of one size -> fc (B, 2048), att (B, att_size, att_size, 2048)."""
        x = self.cnn.features(images)  # (B, 2048, h, w)
        fc = x.mean(3).mean(2)  # (B, 2048)
        att = F.adaptive_avg_pool2d(x, [self.att_size, self.att_size]).permute(0, 2, 3, 1)  # (B, a, a, 2048)
        return fc, att


def load_extractor(cnn_model='resnet101', weights=None, att_size=14, device='cpu', layers=None):
    """GridFeatures with cnn_model's ImageNet weights (default data/imagenet_weights/<model>.pth),
    in eval mode on device; layers: another depth (tests)."""
    if att_size < 1:
        raise SaticError(f'--att_size must be >= 1 (got {att_size}; the reference uses 14 or 7)')
    cnn = load_resnet(cnn_model, weights or default_cnn_weights(cnn_model), layers)
    return GridFeatures(cnn, att_size).to(device).eval()
