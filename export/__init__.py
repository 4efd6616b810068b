"""ONNX export of trifuse models, verified in ONNX Runtime against PyTorch."""
