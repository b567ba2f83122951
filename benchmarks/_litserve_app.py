"""LitServe serving a roadwork bundle's ONNX file, for benchmarks/serve_load.py (same batching settings)."""

from __future__ import annotations

import base64
import sys

import litserve as ls
import numpy as np
import onnxruntime as ort

from roadwork.data.preprocess import load_rgb, preprocess
from roadwork.models.factory import ModelCard


class OnnxAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        root = sys.argv[1]
        self.card = ModelCard.load(f"{root}/model.json")
        self.sess = ort.InferenceSession(f"{root}/model.onnx", providers=["CPUExecutionProvider"])

    def decode_request(self, request: dict) -> np.ndarray:  # type: ignore[override]
        return preprocess([load_rgb(base64.b64decode(request["image"]))], self.card.preprocess)[0]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:  # type: ignore[override]
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:  # type: ignore[override]
        z = self.sess.run(None, {"input": x})[0]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:  # type: ignore[override]
        return list(output)

    def encode_response(self, p: np.ndarray) -> dict:  # type: ignore[override]
        k = int(p.argmax())
        return {"label": self.card.classes[k], "probability": float(p[k])}


if __name__ == "__main__":
    batch = int(sys.argv[3])
    try:
        api = OnnxAPI(max_batch_size=batch, batch_timeout=0.005)
        server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    except TypeError:  # older LitServe: batching settings on the server
        server = ls.LitServer(OnnxAPI(), accelerator="cpu", max_batch_size=batch, batch_timeout=0.005)
    server.run(port=int(sys.argv[2]), generate_client_file=False)
