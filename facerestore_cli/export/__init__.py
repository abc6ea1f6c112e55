"""The restorer as an exported inference engine: one ONNX graph (onnxruntime) or a TensorRT engine.

    source         which model an engine is made from, and its content fingerprint
    meta           the JSON sidecar next to every engine, and the checks `restore` runs on it
    cache          where engines made on demand by `restore` are kept (~/.cache/facerestore)
    onnx_export    torch -> ONNX (encoder + UNet step(s) + decoder in one graph, dynamic batch)
    tensorrt_build ONNX -> fp16 TensorRT engine (needs the `tensorrt` package and a CUDA GPU)
    backends       engines as drop-in replacements of `model(x)` for `restore_crops`

Nothing here imports onnx, onnxruntime or tensorrt at import time: they are optional extras.
"""

from facerestore_cli.export.meta import BackendUnavailable, EngineError

__all__ = ["BackendUnavailable", "EngineError"]
