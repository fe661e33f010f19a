// Stands in for the CUDA runtime header when csrc/cuda compiles for the emulation.
#pragma once
#include "../cuda_emulation.h"
