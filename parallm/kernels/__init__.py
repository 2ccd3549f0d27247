"""Triton kernels, each a plain function beside a PyTorch reference twin (tests compare them).

Nothing here is an ``nn.Module``: layers and the engine call these functions.
"""
