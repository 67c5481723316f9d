"""Serving: the Open Inference Protocol data plane over REST and gRPC, backed by ONNX Runtime."""
