"""Models and training pieces of a FedMPQ client: bit-plane layers, the fused ReLU6 +
activation quantizer, the CIFAR ResNets and a small CNN (float and quantized), the bit-plane
optimizer, and conversions to and from float state dicts. Built on ``fedmpq_kernels``' public
API only."""
from .convert import bit_assignment, float_state, load_float_state_dict, to_float_state_dict
from .layers import ActQuant, BatchedWeights, BitConv2d, BitLinear, batch_weights, bit_layers
from .models import CifarResNet, SmallCNN, build, resnet20, resnet44, small_cnn
from .optim import BitPlaneOptimizer, FloatSGD, float_parameters, regularizer, state_bytes_per_weight

__all__ = [
    "ActQuant", "BatchedWeights", "BitConv2d", "BitLinear", "batch_weights", "bit_layers", "CifarResNet", "SmallCNN", "build", "resnet20", "resnet44",
    "small_cnn", "BitPlaneOptimizer", "FloatSGD", "float_parameters", "regularizer", "state_bytes_per_weight", "bit_assignment", "float_state",
    "load_float_state_dict", "to_float_state_dict",
]
