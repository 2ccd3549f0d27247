"""Triton kernels, each a plain function with a PyTorch twin in ``reference`` (tests compare them).

Nothing here is an ``nn.Module``: layers and the engine call these functions.
"""
