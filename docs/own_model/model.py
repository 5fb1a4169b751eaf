"""A hand-written HRNet-style landmark model, as cephalometric projects publish theirs (not one of tune_landmarks'):
its own module names, three resolution branches fused at 1/4, and heatmap logits upsampled to the input size,
read with a sigmoid and a soft-argmax over the whole map."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c), nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.b(self.a(x)))


class HRNetLandmarkModel(nn.Module):
    def __init__(self, num_landmarks=19, width=32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_bn(3, w, 2), conv_bn(w, w, 2))
        self.layer1 = nn.Sequential(Residual(w), Residual(w))
        self.transition1 = nn.ModuleList([nn.Identity(), conv_bn(w, 2 * w, 2)])
        self.stage2 = nn.ModuleList([Residual(w), Residual(2 * w)])
        self.transition2 = conv_bn(2 * w, 4 * w, 2)
        self.stage3 = nn.ModuleList([Residual(w), Residual(2 * w), nn.Sequential(Residual(4 * w), Residual(4 * w))])
        self.fuse = conv_bn(7 * w, 2 * w)
        self.final_layers = nn.Conv2d(2 * w, num_landmarks, 1)

    def forward(self, x):
        size = x.shape[-2:]
        y = self.layer1(self.stem(x))
        b1, b2 = self.stage2[0](self.transition1[0](y)), self.stage2[1](self.transition1[1](y))
        b3 = self.stage3[2](self.transition2(b2))
        b1, b2 = self.stage3[0](b1), self.stage3[1](b2)
        up = [b1] + [F.interpolate(b, size=b1.shape[-2:], mode="bilinear", align_corners=False) for b in (b2, b3)]
        logits = self.final_layers(self.fuse(torch.cat(up, 1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
