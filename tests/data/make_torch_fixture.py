"""Writes the torch-made fixtures of tests/test_models.py's ``.pth`` reader tests (run once, by hand).

Not run by the test suite and not collected by pytest (the name does not start with ``test``): the suite
reads the files this script wrote, so CI needs no torch. They were written with torch 2.13.0 (CPU
wheel) and numpy 2.4, from the repository root, in a virtual environment outside the repository:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/data/make_torch_fixture.py

Files (all in tests/data/):
  vgg16_32_bn.pth           torch.save of a state dict with torchvision ``vgg16_bn``'s key layout
                            (``features.{0,1,3,4,7,...}``) at VGG16 widths / 32 and a Dropout + Linear head
                            (``classifier.1``, 16 x 2 x 2 -> 3, i.e. a 64 x 64 input). Some entries are
                            saved as views on purpose, so the reader's stride, offset and dtype paths run:
                            a permuted conv kernel, a transposed head weight, BN tensors sharing one
                            storage at offsets, strided slices with junk between the elements, float16,
                            bfloat16 (sharing a storage) and float64 entries, an nn.Parameter, and the
                            int64 ``num_batches_tracked`` scalars as 0-d views into one int64 storage.
  vgg16_32_bn_expected.npz  the same values written by numpy from the torch tensors (``t.float().numpy()``
                            for float16/bfloat16, ``t.numpy()`` otherwise) plus ``_dtypes``, rows
                            (key, torch dtype name): the reference the reader's output is compared to.
  checkpoint_nested.pth     a training checkpoint ``{'epoch', 'model', 'optimizer'}`` (an nn.Linear(2, 2)
                            state dict nested under ``'model'``, SGD momentum state) and, beside it,
                            checkpoint_nested_expected.npz with the two model tensors.
  legacy_format.pth         ``_use_new_zipfile_serialization=False`` (torch < 1.6's format): refused.
  torchscript.pt            ``torch.jit.save`` of a scripted nn.Linear(2, 2): refused.
"""

import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTHS = [2, 2, "M", 4, 4, "M", 8, 8, 8, "M", 16, 16, 16, "M", 16, 16, 16, "M"]  # VGG16 / 32
NUM_CLASSES, SIDE = 3, 2  # a 64 x 64 input leaves a 16 x 2 x 2 map after five pools


def vgg_bn_state_dict():
    """A torchvision-layout VGG-BN's ``state_dict()`` with deterministic, non-trivial values."""
    torch.manual_seed(0)
    layers, in_c = [], 3
    for w in WIDTHS:
        if w == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            in_c = w
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(in_c * SIDE * SIDE, NUM_CLASSES))
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.BatchNorm2d):  # the defaults (1, 0, 0, 1) would hide a swapped entry
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def main():
    sd = vgg_bn_state_dict()  # an OrderedDict with ``_metadata``, as torchvision's file holds
    with torch.no_grad():
        # A conv kernel stored HWIO and saved as its OIHW permutation: strides (1, 2, 18, 6).
        k = "features.0.weight"
        sd[k] = sd[k].permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
        # The head weight saved as a transposed view: strides (1, 3).
        k = "classifier.1.weight"
        sd[k] = sd[k].t().contiguous().t()
        # All four float BN tensors of features.1 as views of one storage at offsets 0, 2, 4, 6.
        names = [f"features.1.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
        buf = torch.cat([sd[n] for n in names])
        for i, n in enumerate(names):
            sd[n] = buf[2 * i : 2 * i + 2]
        # A stride-2 slice with junk (-7) between the elements, and an offset-1 stride-3 slice.
        k = "features.4.running_var"
        big = torch.full((2 * sd[k].numel(),), -7.0)
        big[0::2] = sd[k]
        sd[k] = big[0::2]
        k = "features.8.bias"
        big = torch.full((3 * sd[k].numel() + 1,), -7.0)
        big[1::3] = sd[k]
        sd[k] = big[1::3]
        # Other dtypes: a float16 conv bias, a bfloat16 BN weight and bias sharing one storage (the
        # bias at offset 16), a float64 running mean, and a Parameter (pickled by _rebuild_parameter).
        sd["features.24.bias"] = sd["features.24.bias"].half()
        bf = torch.cat([sd["features.25.weight"], sd["features.25.bias"]]).bfloat16()
        sd["features.25.weight"], sd["features.25.bias"] = bf[:16], bf[16:]
        sd["features.35.running_mean"] = sd["features.35.running_mean"].double()
        sd["classifier.1.bias"] = nn.Parameter(sd["classifier.1.bias"].clone())
        # num_batches_tracked: 0-d int64 views into one storage (values 7, 8, ...) at offsets 0..12.
        keys = [k for k in sd if k.endswith("num_batches_tracked")]
        counts = torch.arange(7, 7 + len(keys), dtype=torch.int64)
        for i, k in enumerate(keys):
            sd[k] = counts[i]
    torch.save(sd, os.path.join(HERE, "vgg16_32_bn.pth"))
    expected = {
        k: (v.detach().float() if v.dtype in (torch.float16, torch.bfloat16) else v.detach()).numpy()
        for k, v in sd.items()
    }
    dtypes = np.array([[k, str(v.dtype)] for k, v in sd.items()])
    np.savez(os.path.join(HERE, "vgg16_32_bn_expected.npz"), _dtypes=dtypes, **expected)

    torch.manual_seed(1)
    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckpt = {"epoch": 5, "model": lin.state_dict(), "optimizer": opt.state_dict()}
    torch.save(ckpt, os.path.join(HERE, "checkpoint_nested.pth"))
    np.savez(
        os.path.join(HERE, "checkpoint_nested_expected.npz"),
        **{k: v.numpy() for k, v in lin.state_dict().items()},
    )

    torch.save(
        {"w": torch.arange(4.0)},
        os.path.join(HERE, "legacy_format.pth"),
        _use_new_zipfile_serialization=False,
    )
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), os.path.join(HERE, "torchscript.pt"))


if __name__ == "__main__":
    main()
