// The fused kernels for bf16 rows: fused.cu compiled for one element type, so
// that the three types compile in parallel (fused.h, FusedOps).
#define MAR_ELEMENT_TYPE bf16_t
#include "fused.cu"
