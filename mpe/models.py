"""The papers' models, as plain ``nn.Sequential``-style modules built from Linear and Conv2d layers.

All models take images ``(N, C, H, W)`` and return logits ``(N, K)``. Parameter counts of the MPE models match the
paper (App. I.1): MLP(500,300) 545,810; MLP(32,16) 25,818; LeNet5 61,706; CNN 3c3d 895,210; ResNet-20-FRN 274,042.
lpNTK's "LeNet" (the PyTorch MNIST-example CNN) has 1,199,882.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["softmax_regression", "mlp", "lenet5", "cnn_3c3d", "resnet20_frn", "small_cnn", "lpntk_cnn",
           "mnist_example_cnn", "toneva_mnist_cnn", "resnet18", "wide_resnet", "cifarnet", "get_model", "MODELS", "n_params"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def softmax_regression(in_shape=(1, 28, 28), n_classes: int = 10) -> nn.Sequential:
    """Multinomial logistic regression: logits = W vec(x) + b."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), n_classes))


def mlp(in_shape=(1, 28, 28), hidden=(32, 16), n_classes: int = 10, activation: str = "tanh") -> nn.Sequential:
    """Fully connected net ``in -> hidden[0] -> ... -> n_classes``; MPE's small_mlp is hidden=(32, 16), tanh."""
    layers, width = [nn.Flatten()], math.prod(in_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_classes))


def lenet5(in_shape=(1, 28, 28), n_classes: int = 10, activation: str = "tanh") -> nn.Sequential:
    """LeNet5 as in the MPE code: tanh, average pooling, conv 1->6 (pad 2), 6->16, 16->120, fc 120->84->K."""
    c = in_shape[0]
    act = lambda: _activation(activation)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), act(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2),
        nn.Conv2d(16, 120, 5), act(), nn.Flatten(),
        nn.Linear(120, 84), act(), nn.Linear(84, n_classes))


class SamePad(nn.Module):
    """TensorFlow 'same' padding for a following conv/pool of ``kernel`` and ``stride`` (extra pixel at the end)."""

    def __init__(self, kernel: int, stride: int, value: float = 0.0):
        super().__init__()
        self.kernel, self.stride, self.value = kernel, stride, value

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)


def cnn_3c3d(in_shape=(3, 32, 32), n_classes: int = 10) -> nn.Sequential:
    """DeepOBS 3c3d (MPE's cnn_deepobs): 3 conv + 3 fc, ReLU, max-pool 3/2 'same', Xavier init, zero bias."""
    pool = lambda: nn.Sequential(SamePad(3, 2, float("-inf")), nn.MaxPool2d(3, 2))  # noqa: E731
    net = nn.Sequential(
        nn.Conv2d(in_shape[0], 64, 5), nn.ReLU(), pool(),
        nn.Conv2d(64, 96, 3), nn.ReLU(), pool(),
        SamePad(3, 1), nn.Conv2d(96, 128, 3), nn.ReLU(), pool(), nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, n_classes))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class FRN(nn.Module):
    """Filter Response Normalisation with a thresholded linear unit: max(γ x / sqrt(mean(x²) + ε) + β, τ)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.tau = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(dim=(2, 3), keepdim=True) + self.eps)
        return torch.maximum(self.gamma * x + self.beta, self.tau)


def _conv_frn(cin, cout, kernel, stride):
    return nn.Sequential(SamePad(kernel, stride), nn.Conv2d(cin, cout, kernel, stride), FRN(cout))


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(_conv_frn(cin, cout, 3, stride), _conv_frn(cout, cout, 3, 1))
        self.shortcut = _conv_frn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def resnet20_frn(in_shape=(3, 32, 32), n_classes: int = 10) -> nn.Sequential:
    """ResNet-20 with FRN instead of BatchNorm (widths 16/32/64, 3 blocks per stage, 1x1 projection shortcuts)."""
    layers, cin = [_conv_frn(in_shape[0], 16, 3, 1)], 16
    for width, stride in [(16, 1), (32, 2), (64, 2)]:
        for b in range(3):
            layers.append(_Block(cin, width, stride if b == 0 else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes))


def small_cnn(in_shape=(1, 28, 28), n_classes: int = 10, channels=(8, 16), activation: str = "relu") -> nn.Sequential:
    """A small CNN for the quick profile: two conv(5x5)+pool stages and a linear read-out."""
    layers, c, h, w = [], in_shape[0], in_shape[1], in_shape[2]
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 5, padding=2), _activation(activation), nn.MaxPool2d(2)]
        c, h, w = ch, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, n_classes))


def lpntk_cnn(in_shape=(1, 28, 28), n_classes: int = 10) -> nn.Sequential:
    """The lpNTK notes' "SmallCNN": conv(16, 5) ReLU pool, conv(32, 5) ReLU pool, fc 64, ReLU, fc (≈47k on 28x28)."""
    c, h, w = in_shape
    h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    return nn.Sequential(nn.Conv2d(c, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * h * w, 64), nn.ReLU(), nn.Linear(64, n_classes))


def mnist_example_cnn(in_shape=(1, 28, 28), n_classes: int = 10) -> nn.Sequential:
    """lpNTK's "LeNet" (the PyTorch MNIST example): conv 32, conv 64 (3x3), pool, dropout, fc 128, dropout; 1,199,882."""
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(128, n_classes))


def toneva_mnist_cnn(in_shape=(1, 28, 28), n_classes: int = 10, dropout: bool = False) -> nn.Sequential:
    """Toneva et al.'s MNIST network (the PyTorch example CNN, their ``run_mnist.py``): conv(10, 5) pool ReLU,
    conv(20, 5) [Dropout2d] pool ReLU, fc 50 ReLU [dropout], fc; 21,840 parameters on 28x28. Their README runs use
    no dropout, the default here."""
    c, h, w = in_shape
    h, w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
    drop2, drop = (nn.Dropout2d(0.5), nn.Dropout(0.5)) if dropout else (nn.Identity(), nn.Identity())
    return nn.Sequential(nn.Conv2d(c, 10, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(10, 20, 5), drop2, nn.MaxPool2d(2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(20 * h * w, 50), nn.ReLU(), drop, nn.Linear(50, n_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(in_shape=(3, 32, 32), n_classes: int = 10, norm: str = "batch") -> nn.Sequential:
    """The CIFAR ResNet-18 of Toneva et al. and lpNTK (3x3 stem, no max-pool, widths 64-512; 11.2M parameters).
    ``norm="none"`` drops the batch norms (lpNTK's variant: per-example kernels need no cross-example coupling)."""
    norms = {"batch": nn.BatchNorm2d, "none": lambda c: nn.Identity()}
    if norm not in norms:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(norms)}")
    nf = norms[norm]
    layers, cin = [nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False), nf(64), nn.ReLU()], 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_BasicBlock(cin, width, stride, nf), _BasicBlock(width, width, 1, nf)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, n_classes))


def resnet9(in_shape=(3, 32, 32), n_classes: int = 2, norm: str = "batch", width: int = 64) -> nn.Sequential:
    """dattri's CIFAR-2 ResNet-9 (its benchmark, without dropout as there): a 3x3 stem of 64 channels with batch norm,
    one basic block each of 128 (stride 1), 256 and 512 channels (stride 2; 1x1 convolution shortcuts), global average
    pooling, linear; 4.8M parameters for two classes. ``width`` scales every width (64: the benchmark's; smaller for
    smoke tests); ``norm="none"`` drops the batch norms (per-example curvature and vectorised retrains need none)."""
    norms = {"batch": nn.BatchNorm2d, "none": lambda c: nn.Identity()}
    if norm not in norms or width < 1:
        raise ValueError(f"norm must be one of {', '.join(norms)} and width positive, got {norm!r}, {width}")
    nf, w = norms[norm], width
    layers, cin = [nn.Conv2d(in_shape[0], w, 3, 1, 1, bias=False), nf(w), nn.ReLU()], w
    for cout, stride in [(2 * w, 1), (4 * w, 2), (8 * w, 2)]:
        layers.append(_BasicBlock(cin, cout, stride, nf))
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes))


class _WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3; a 1x1 conv of the activated input as the
    shortcut when the shape changes."""

    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.Dropout(dropout),
                                  nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False))
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = self.pre(x)
        return self.body(a) + (x if self.skip is None else self.skip(a))


def wide_resnet(in_shape=(3, 32, 32), n_classes: int = 10, depth: int = 28, width: int = 10,
                dropout: float = 0.3) -> nn.Sequential:
    """Zagoruyko & Komodakis' WRN-depth-width for CIFAR (the Cutout code's version that Toneva et al. use, dropout
    0.3): a 3x3 stem of 16, three groups of (depth - 4) / 6 pre-activation blocks of 16k, 32k, 64k channels, BN-ReLU,
    global average pooling, linear. WRN-28-10 has 36.5M parameters."""
    if (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4, got {depth}")
    n, layers, cin = (depth - 4) // 6, [nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)], 16
    for cout, stride in [(16 * width, 1), (32 * width, 2), (64 * width, 2)]:
        for i in range(n):
            layers.append(_WideBlock(cin, cout, stride if i == 0 else 1, dropout))
            cin = cout
    return nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(cin, n_classes))


def cifarnet(in_shape=(3, 32, 32), n_classes: int = 60) -> nn.Sequential:
    """FROMP's and LAFTR's Split-CIFAR network: conv32 (same), conv32, pool, dropout 0.25, conv64 (same), conv64,
    pool, dropout 0.25, fc 512, dropout 0.5, one output per class of all tasks (60 for 6 tasks); 1,276,508
    parameters with 60 outputs."""
    c, h, w = in_shape
    h, w = ((h - 2) // 2 - 2) // 2, ((w - 2) // 2 - 2) // 2
    return nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.25), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * h * w, 512), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(512, n_classes))


MODELS = {
    "softmax_regression": softmax_regression,
    "small_mlp": lambda in_shape=(1, 28, 28), n_classes=10: mlp(in_shape, (32, 16), n_classes),
    "large_mlp": lambda in_shape=(1, 28, 28), n_classes=10: mlp(in_shape, (500, 300), n_classes),
    "mlp": mlp,
    "lenet5": lenet5,
    "cnn_3c3d": cnn_3c3d,
    "resnet20_frn": resnet20_frn,
    "small_cnn": small_cnn,
    "lpntk_cnn": lpntk_cnn,
    "mnist_example_cnn": mnist_example_cnn,
    "toneva_mnist_cnn": toneva_mnist_cnn,
    "jiang_mlp": lambda in_shape=(1, 28, 28), n_classes=10: mlp(in_shape, (512, 256), n_classes, "relu"),
    "resnet18": resnet18,
    "resnet9": resnet9,
    "resnet18_nobn": lambda in_shape=(3, 32, 32), n_classes=10: resnet18(in_shape, n_classes, "none"),
    "cifarnet": cifarnet,
    "wrn28_10": wide_resnet,
    "laftr_mlp": lambda in_shape=(1, 28, 28), n_classes=10: mlp(in_shape, (100, 100), n_classes, "relu"),
}


def get_model(name: str, in_shape, n_classes: int = 10, seed: int | None = None, **kwargs) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`); ``seed`` fixes the initialisation."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    model = MODELS[name](in_shape=tuple(in_shape), n_classes=n_classes, **kwargs)
    model.model_name = name  # its name in the registry: the training ledger (mpe.train.work) counts runs by it
    return model
