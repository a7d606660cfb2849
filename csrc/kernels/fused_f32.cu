// The fused kernels for f32 rows: fused.cu compiled for one element type, so
// that the three types compile in parallel (fused.h, FusedOps).
#define MAR_ELEMENT_TYPE float
#include "fused.cu"
