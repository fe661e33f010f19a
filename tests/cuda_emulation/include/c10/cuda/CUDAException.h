// cuda_emulation::launch throws on a bad launch itself, so there is nothing left to check.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(call) ((void)(call))
