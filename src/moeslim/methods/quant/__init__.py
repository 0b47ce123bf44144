"""Mixed-precision expert quantization (PMQ): bit allocation (allocate), GPTQ/RTN (gptq), packing (pack)."""
