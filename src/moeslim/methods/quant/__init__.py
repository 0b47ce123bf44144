"""Mixed-precision expert quantization (PMQ): widths (driver: factors + exact allocation) -> a JSON plan; the
packed format and GPTQ/RTN maths (fused, gptq, pack); the GPTQ pass that ``apply`` runs (transform)."""
