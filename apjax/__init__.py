"""apjax: attribution-preserving network compression in JAX/Flax.

Implements "Attribution Preservation in Network Compression for Reliable Network
Interpretation" (NeurIPS 2020). Sub-packages:

- ``apjax.models``: the VGG family with named attribution taps and torchvision weight import.
- ``apjax.data``: the synthetic benchmark, the PASCAL VOC 2012 tfds builder and the input
  pipeline (host uint8 cache, on-device augmentation).
"""

__version__ = "0.1.0"
