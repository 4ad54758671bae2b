"""The GPU fast path: Triton kernels, their availability, kernel overlap and CUDA graphs, behind the fused steps."""
