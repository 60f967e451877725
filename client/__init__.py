"""How the frontend reaches compute nodes: the Backend interface and its implementations."""
from .backend import Backend, NodeInfo, Pending
from .graph_builder import GraphBuilder, TensorRef, Value

__all__ = ["Backend", "NodeInfo", "Pending", "GraphBuilder", "TensorRef", "Value"]
