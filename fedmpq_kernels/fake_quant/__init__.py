"""Fake-quant: FedMPQ's activation quantizer, alone or fused with ReLU6. The math and bitmap
layout are stated in :mod:`.reference`; the schemas, autograd and the public functions in
:mod:`.ops`."""
from .ops import fake_quant, relu6_fake_quant

__all__ = ["fake_quant", "relu6_fake_quant"]
