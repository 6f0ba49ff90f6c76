"""Handing a trained model over: ONNX / TorchScript export with proven parity, its preprocessing file and
model card (`python cli.py export`). `export.layout` names the export folder's files without importing torch,
so the ONNX server can read an export with only ONNX Runtime installed."""
