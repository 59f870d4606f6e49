"""Make the sample models: small torch.nn networks, each showing one pathology.

    python sample_models/make_samples.py

Deterministic (seeded). Every model is built only from torch.nn classes, so
``nnhealth scan`` loads it without --trust. Each MODEL.pt has MODEL.batch.pt beside it:
``(inputs, targets)`` saved with torch.save.
"""

from __future__ import annotations

import itertools
import math
import zlib
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def batch(
    n: int, dim: int, classes: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def init_scaled(model: nn.Module, std: float | None, gen: torch.Generator) -> None:
    """W = std * randn (std None: He, 2/fan_in), biases 0."""
    with torch.no_grad():
        for lin in linears(model):
            s = math.sqrt(2.0 / lin.in_features) if std is None else std
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * s)
            lin.bias.zero_()


def healthy_relu_mlp(gen: torch.Generator):
    """He-initialized ReLU MLP 784-256-256-256-10: the healthy reference."""
    model = mlp([784, 256, 256, 256, 10], nn.ReLU)
    init_scaled(model, None, gen)
    return model, batch(256, 784, 10, gen)


def tanh_vanishing(gen: torch.Generator):
    """The classic 5 x 500 tanh net with W = 0.01 * randn: activations collapse to 0."""
    model = mlp([500] * 6 + [10], nn.Tanh)
    init_scaled(model, 0.01, gen)
    return model, batch(256, 500, 10, gen)


def tanh_saturated(gen: torch.Generator):
    """The same 5 x 500 tanh net with W = randn: almost every unit saturates."""
    model = mlp([500] * 6 + [10], nn.Tanh)
    init_scaled(model, 1.0, gen)
    return model, batch(256, 500, 10, gen)


def sigmoid_large(gen: torch.Generator):
    """A sigmoid MLP 256-256-256-256-10 with large weights (W = randn)."""
    model = mlp([256, 256, 256, 256, 10], nn.Sigmoid)
    init_scaled(model, 1.0, gen)
    return model, batch(256, 256, 10, gen)


def relu_dead_bias(gen: torch.Generator):
    """He-init ReLU MLP whose second layer's biases were pushed to -6 for 60% of units."""
    model = mlp([256, 256, 256, 256, 10], nn.ReLU)
    init_scaled(model, None, gen)
    with torch.no_grad():
        fc2 = linears(model)[1]
        killed = torch.randperm(256, generator=gen)[: int(0.6 * 256)]
        fc2.bias.fill_(0.01)
        fc2.bias[killed] = -6.0
    return model, batch(256, 256, 10, gen)


def zero_init_mlp(gen: torch.Generator):
    """A ReLU MLP with every weight and bias zero: all units identical (and dead)."""
    model = mlp([128, 128, 128, 10], nn.ReLU)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, batch(128, 128, 10, gen)


def nan_weight(gen: torch.Generator):
    """The healthy MLP after a divergent step: one NaN in the second layer's weights."""
    model = mlp([128, 128, 128, 10], nn.ReLU)
    init_scaled(model, None, gen)
    with torch.no_grad():
        linears(model)[1].weight[3, 7] = float("nan")
    return model, batch(128, 128, 10, gen)


def duplicated_units(gen: torch.Generator):
    """He ReLU MLP whose second layer has units 1-4 copied from unit 0 (net2net-style
    widening without noise): 5 units that can never become different."""
    model = mlp([256, 256, 256, 10], nn.ReLU)
    init_scaled(model, None, gen)
    with torch.no_grad():
        fc2 = linears(model)[1]
        fc2.weight[1:5] = fc2.weight[0]
        fc2.bias[1:5] = fc2.bias[0]
    return model, batch(256, 256, 10, gen)


def xavier_deep_relu(gen: torch.Generator):
    """A 10-layer ReLU MLP with Xavier-scale init (Var = 1/fan_in, half of He's)."""
    model = mlp([128] * 11 + [10], nn.ReLU)
    init_scaled(model, None, gen)
    with torch.no_grad():
        for lin in linears(model):
            lin.weight.mul_(math.sqrt(0.5))  # 2/fan_in -> 1/fan_in = 2/(fan_in + fan_out)
    return model, batch(256, 128, 10, gen)


def norm_spread_bn(gen: torch.Generator):
    """Linear-BatchNorm-ReLU x3 with the second layer's weights x100: BatchNorm makes the
    output scale-free, so that layer's ||w||/||grad w|| is 1e4 times its neighbours'."""
    layers: list[nn.Module] = []
    for _ in range(3):
        layers += [nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(128, 10))
    init_scaled(model, None, gen)
    with torch.no_grad():
        linears(model)[1].weight.mul_(100.0)
    return model, batch(256, 128, 10, gen)


def cnn_bn(gen: torch.Generator):
    """Conv-BatchNorm-ReLU stack (He init, torchvision style): healthy, normalized."""
    layers: list[nn.Module] = []
    channels = [3, 16, 16, 32, 32]
    for a, b in itertools.pairwise(channels):
        layers += [
            nn.Conv2d(a, b, 3, padding=1, bias=False),
            nn.BatchNorm2d(b),
            nn.ReLU(inplace=True),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(
                    torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_out)
                )
    x = torch.randn(32, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    return model, (x, y)


SAMPLES = {
    "healthy_relu_mlp": healthy_relu_mlp,
    "tanh_vanishing": tanh_vanishing,
    "tanh_saturated": tanh_saturated,
    "sigmoid_large": sigmoid_large,
    "relu_dead_bias": relu_dead_bias,
    "zero_init_mlp": zero_init_mlp,
    "nan_weight": nan_weight,
    "cnn_bn": cnn_bn,
    "duplicated_units": duplicated_units,
    "xavier_deep_relu": xavier_deep_relu,
    "norm_spread_bn": norm_spread_bn,
}


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The sample ``name`` rebuilt in memory (the same tensors as the committed files)."""
    seed = zlib.crc32(name.encode())  # stable per name, whatever other samples exist
    torch.manual_seed(seed)  # PyTorch's default init of the layers we leave as they are
    model, data = SAMPLES[name](torch.Generator().manual_seed(seed))
    return model.train(), data


def main(out: Path = HERE) -> None:
    for name in SAMPLES:
        model, data = build(name)
        torch.save(model, out / f"{name}.pt")
        torch.save(data, out / f"{name}.batch.pt")
        print(f"{name}.pt  {sum(p.numel() for p in model.parameters()):,} params")


if __name__ == "__main__":
    main()
