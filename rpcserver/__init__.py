"""A compute node: device buffers, the graph executor and its kernels, the gRPC servicer."""
