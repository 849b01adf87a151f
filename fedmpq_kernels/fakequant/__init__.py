"""Fake-quant: FedMPQ's activation quantizer. The math and bitmap layout are stated in
:mod:`.reference`; the schemas, autograd and the public function in :mod:`.ops`."""
from .ops import fake_quant

__all__ = ["fake_quant"]
