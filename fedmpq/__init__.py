"""fedmpq: FedMPQ mixed-precision quantized federated learning, built on fedmpq_kernels.

Only the package exists so far: the quantized layers, client, server, wire format,
simulation, `fedmpq` command and Flower app arrive with their own issues
(see ARCHITECTURE.md). It uses fedmpq_kernels' public API only, never a backend.
"""
