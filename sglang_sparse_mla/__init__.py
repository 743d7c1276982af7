"""sglang-sparse-mla: DeepSeek Sparse Attention kernels and SGLang backend for every CUDA GPU."""

__version__ = "0.1.0"
