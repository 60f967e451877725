"""llamarpc: GGUF language models served over llama.cpp/OpenAI HTTP APIs, layers on gRPC nodes.

The code lives in the top-level folders proto/, rpcserver/, client/ and frontend/, installed as
the subpackages llamarpc.proto, llamarpc.rpcserver, llamarpc.client and llamarpc.frontend.
"""
__version__ = "0.1.0"
