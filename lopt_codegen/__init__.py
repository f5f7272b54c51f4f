"""lopt_codegen: a compiler for learned optimizers (YAML spec -> fused kernels + a
PyTorch optimizer)."""
__version__ = "0.1.0"
