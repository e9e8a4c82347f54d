"""An independent float64 ResNet in numpy, in torch's NCHW layout, and torchvision-layout state dicts.

numpy only (no jax), so that ``tests/data/make_resnet_fixture.py`` can use it beside torch. Written from
torchvision's ResNet definition: conv1 7x7/2 (pad 3, no bias) -> bn1 -> ReLU -> max-pool 3x3/2 (pad 1)
-> layer1..4 (BasicBlock: conv3x3(stride)-bn-relu-conv3x3-bn; Bottleneck: conv1x1-bn-relu-conv3x3(stride)-
bn-relu-conv1x1(x4)-bn; shortcut downsample.0 conv1x1(stride) + downsample.1 BN where shape changes;
sum then ReLU) -> average pool -> fc.
"""

from __future__ import annotations

import numpy as np

BLOCKS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


def torchvision_resnet_state_dict(depth: int, divisor: int, num_classes: int, seed: int) -> dict:
    """Random float32 weights under torchvision's ResNet keys (BN statistics non-trivial)."""
    rng = np.random.default_rng(seed)
    kind, blocks = BLOCKS[depth]
    expansion = 1 if kind == "basic" else 4
    sd = {}

    def conv(key, out_c, in_c, k):
        sd[f"{key}.weight"] = rng.normal(0, (2 / (k * k * in_c)) ** 0.5, (out_c, in_c, k, k)).astype(
            np.float32
        )

    def bn(key, c):
        sd[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{key}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{key}.num_batches_tracked"] = np.array(3, np.int64)

    in_c = max(1, 64 // divisor)
    conv("conv1", in_c, 3, 7)
    bn("bn1", in_c)
    for s, (n, base) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        width = max(1, base // divisor)
        for b in range(n):
            stride = 2 if (b == 0 and s > 1) else 1
            p = f"layer{s}.{b}"
            if kind == "basic":
                conv(f"{p}.conv1", width, in_c, 3)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
            else:
                conv(f"{p}.conv1", width, in_c, 1)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", width * expansion, width, 1)
                bn(f"{p}.bn3", width * expansion)
            if stride != 1 or in_c != width * expansion:
                conv(f"{p}.downsample.0", width * expansion, in_c, 1)
                bn(f"{p}.downsample.1", width * expansion)
            in_c = width * expansion
    sd["fc.weight"] = rng.normal(0, 0.1, (num_classes, in_c)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
    return sd


def _conv(x, w, stride, pad):
    """NCHW cross-correlation, float64."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, o, oh, ow))
    for dy in range(k):
        for dx in range(k):
            patch = x[:, :, dy : dy + stride * oh : stride, dx : dx + stride * ow : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out


def _bn(x, sd, key):
    g, b = sd[f"{key}.weight"], sd[f"{key}.bias"]
    m, v = sd[f"{key}.running_mean"], sd[f"{key}.running_var"]
    return (x - m[None, :, None, None]) / np.sqrt(v[None, :, None, None] + 1e-5) * g[None, :, None, None] + b[
        None, :, None, None
    ]


def _maxpool3s2p1(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
    return np.max(
        [x[:, :, dy : dy + 2 * h : 2, dx : dx + 2 * w : 2] for dy in range(3) for dx in range(3)], axis=0
    )


def reference_resnet_logits(sd: dict, depth: int, x_nchw: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the torchvision ResNet held in ``sd`` on images (N, 3, H, W), float64."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    relu = lambda t: np.maximum(t, 0.0)  # noqa: E731
    kind, blocks = BLOCKS[depth]
    x = relu(_bn(_conv(np.asarray(x_nchw, np.float64), sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = _maxpool3s2p1(x)
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            stride = 2 if (b == 0 and s > 1) else 1
            p = f"layer{s}.{b}"
            if kind == "basic":
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1"))
                y = _bn(_conv(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            else:
                y = relu(_bn(_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
                y = relu(_bn(_conv(y, sd[f"{p}.conv2.weight"], stride, 1), sd, f"{p}.bn2"))
                y = _bn(_conv(y, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(_conv(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1")
            x = relu(y + x)
    pooled = x.mean(axis=(2, 3))
    return pooled @ sd["fc.weight"].T + sd["fc.bias"]
