"""fedmpq: FedMPQ mixed-precision quantized federated learning, built on fedmpq_kernels'
public API only (never a backend).

The ``fedmpq`` command (:mod:`fedmpq.cli`) runs a federation in one process
(:mod:`fedmpq.simulate`) or over Flower (:mod:`fedmpq.flower`); both carry the payloads of
:mod:`fedmpq.wire` between :mod:`fedmpq.client` and :mod:`fedmpq.server` through the round
loop of :mod:`fedmpq.federation`. docs/DESIGN.md lists every file's job.
"""
