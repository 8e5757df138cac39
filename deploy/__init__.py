"""Deployment of a trained DHE-VPR outside PyTorch: ONNX export of its two parts (see docs/onnx.md)."""
