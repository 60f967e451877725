"""The wire contract: ``llamarpc.proto`` and the stubs generated from it (never hand-edited)."""
from . import llamarpc_pb2 as pb
from . import llamarpc_pb2_grpc as pb_grpc

PROTOCOL_VERSION = 1

__all__ = ["pb", "pb_grpc", "PROTOCOL_VERSION"]
