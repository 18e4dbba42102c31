"""Model runtimes for serving: ONNX export, parity checks and ONNX Runtime sessions
(``onnx``). torch (the models' own ``forward``) is the fallback and needs nothing here.
"""

from visearch.runtime.onnx import (
    DETECTOR_ONNX,
    EMBEDDER_ONNX,
    OrtDetector,
    OrtEmbedder,
    choose_providers,
    detector_parity,
    embedder_parity,
    export_detector,
    export_embedder,
    export_version_models,
    make_session,
    quantize_embedder,
)

__all__ = [
    "DETECTOR_ONNX",
    "EMBEDDER_ONNX",
    "OrtDetector",
    "OrtEmbedder",
    "choose_providers",
    "detector_parity",
    "embedder_parity",
    "export_detector",
    "export_embedder",
    "export_version_models",
    "make_session",
    "quantize_embedder",
]
