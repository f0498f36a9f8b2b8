// Host emulation stand-in for <cuda_runtime.h> (tests only): see cuda_emu.h.
#pragma once
#include "cuda_emu.h"
