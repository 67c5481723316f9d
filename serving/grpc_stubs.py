"""The OIP gRPC messages and service stubs, as generated in the KServe Python SDK.

`kserve/__init__` parses `sys.argv` at import time (kserve.model_server); our own command
line is hidden from it while the stubs are imported.
"""

from __future__ import annotations

import sys
from types import ModuleType


def _load() -> tuple[ModuleType, ModuleType]:
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as messages
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as services
    finally:
        sys.argv = saved
    return messages, services


pb, pb_grpc = _load()
