// Stand-in for the CUDA runtime header: the kernels of csrc/cuda/*.cu compiled as host C++
// and run under tests/cuda_emu/emu.cpp (one fiber per CUDA thread). See emu.h.
#pragma once
#include "../emu.h"
