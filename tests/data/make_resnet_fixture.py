"""Writes tests/data/resnet18_32.pth, a torch.save'd torchvision-layout ResNet-18/32 state dict (5 classes).

Not run by the suite. It was run once with torch 2.13.0 (CPU) in a separate environment:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  cd tests && /tmp/torchvenv/bin/python data/make_resnet_fixture.py

The values come from ``tests/resnet_reference.py``'s seeded builder, so the test regenerates the expected
arrays with numpy and compares them with what apjax's torch-free reader returns.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet_reference import torchvision_resnet_state_dict  # noqa: E402

sd = torchvision_resnet_state_dict(18, 32, 5, seed=11)
torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, Path(__file__).with_name("resnet18_32.pth"))
