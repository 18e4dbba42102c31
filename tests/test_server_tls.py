"""The server over TLS with a self-signed certificate (skipped without the openssl CLI)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from server.client import SearchClient
from server.serve import RunningServer, ServeConfig

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def tiny_index_for_tls(tmp_path: Path) -> Path:
    import numpy as np
    import torch

    from visearch.embedding import build_embedder, save_embedder
    from visearch.index import build_version

    torch.manual_seed(0)
    save_embedder(build_embedder("tiny", dim=8, input_size=32), tmp_path / "e.pt")
    xb = np.eye(8, dtype=np.float32)[:6]
    meta = [{"sku": f"S{i}", "category": "c", "image_key": "", "title": ""} for i in range(6)]
    build_version(tmp_path / "root", xb, np.arange(6), meta, tmp_path / "e.pt", k1=3)
    return tmp_path / "root"


def test_tls_round_trip(tmp_path: Path, tiny_index_for_tls) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    config = ServeConfig(index_root=tiny_index_for_tls, port=0, use_detector=False,
                         tls_cert=cert, tls_key=key, rerank=False)
    running = RunningServer(config).start()
    try:
        with SearchClient(f"localhost:{running.port}", tls_ca=cert) as c:
            assert c.health() == "SERVING"
            assert c.index_info().ntotal == 6
        with SearchClient(f"localhost:{running.port}", timeout=5) as plain, \
                pytest.raises(grpc.RpcError) as err:
            plain.health()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=0.5)
