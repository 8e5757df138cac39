"""The deterministic weight rule behind parity_reference.pt (see README.md here)."""

import zlib

import torch


def fill_(state_dict, salt=""):
    """Deterministic weights for a state dict, keyed by parameter name (not by order).
    For each key k: g = torch.Generator().manual_seed(zlib.crc32((salt + k).encode()))
      - key ends with '.p' (GeM exponent): 3.0
      - 1-D tensor whose module name contains 'norm' and key ends with 'weight': 1 + 0.1 * randn
      - other 1-D tensors: 0.02 * randn
      - tensors of 2+ dims: randn / sqrt(fan_in), fan_in = numel of t[0] (the product of all dims but the first);
        for a tensor whose first dim is 1 (positional embeddings): randn / sqrt(last dim)
    """
    out = {}
    for k, t in state_dict.items():
        g = torch.Generator().manual_seed(zlib.crc32((salt + k).encode()))
        module = k.split(".")[-2] if "." in k else ""
        if k.endswith(".p"):
            v = torch.full(t.shape, 3.0)
        elif t.dim() == 1 and "norm" in module and k.endswith("weight"):
            v = 1 + 0.1 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:
            v = 0.02 * torch.randn(t.shape, generator=g)
        else:
            fan_in = t[0].numel() if t.shape[0] > 1 else t.shape[-1]
            v = torch.randn(t.shape, generator=g) / (fan_in**0.5)
        out[k] = v.to(t.dtype)
    return out
