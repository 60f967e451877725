from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_INVALID: _ClassVar[OpType]
    GET_ROWS: _ClassVar[OpType]
    RMS_NORM: _ClassVar[OpType]
    LAYER_NORM: _ClassVar[OpType]
    MATMUL: _ClassVar[OpType]
    ADD: _ClassVar[OpType]
    MUL: _ClassVar[OpType]
    SCALE: _ClassVar[OpType]
    ROPE: _ClassVar[OpType]
    ATTENTION: _ClassVar[OpType]
    SILU: _ClassVar[OpType]
    GELU: _ClassVar[OpType]
    SWIGLU: _ClassVar[OpType]
    SOFTMAX: _ClassVar[OpType]
    SOFTCAP: _ClassVar[OpType]
    POOL: _ClassVar[OpType]
    ROPE_SHIFT: _ClassVar[OpType]
OP_INVALID: OpType
GET_ROWS: OpType
RMS_NORM: OpType
LAYER_NORM: OpType
MATMUL: OpType
ADD: OpType
MUL: OpType
SCALE: OpType
ROPE: OpType
ATTENTION: OpType
SILU: OpType
GELU: OpType
SWIGLU: OpType
SOFTMAX: OpType
SOFTCAP: OpType
POOL: OpType
ROPE_SHIFT: OpType

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "client_name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_name: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_name: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "device", "node_name", "quantized_types", "ops", "alignment", "max_message_bytes", "session_id")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTIZED_TYPES_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    device: str
    node_name: str
    quantized_types: _containers.RepeatedScalarFieldContainer[int]
    ops: _containers.RepeatedScalarFieldContainer[OpType]
    alignment: int
    max_message_bytes: int
    session_id: str
    def __init__(self, protocol_version: _Optional[int] = ..., device: _Optional[str] = ..., node_name: _Optional[str] = ..., quantized_types: _Optional[_Iterable[int]] = ..., ops: _Optional[_Iterable[_Union[OpType, str]]] = ..., alignment: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemoryReply(_message.Message):
    __slots__ = ("free_bytes", "total_bytes")
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    free_bytes: int
    total_bytes: int
    def __init__(self, free_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class AllocBufferRequest(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class AllocBufferReply(_message.Message):
    __slots__ = ("buffer_id", "size")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    size: int
    def __init__(self, buffer_id: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class BufferRequest(_message.Message):
    __slots__ = ("buffer_id",)
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    def __init__(self, buffer_id: _Optional[int] = ...) -> None: ...

class ClearBufferRequest(_message.Message):
    __slots__ = ("buffer_id", "value")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    value: int
    def __init__(self, buffer_id: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...

class TensorRef(_message.Message):
    __slots__ = ("buffer_id", "offset", "type", "shape")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    offset: int
    type: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, buffer_id: _Optional[int] = ..., offset: _Optional[int] = ..., type: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SetTensorHeader(_message.Message):
    __slots__ = ("buffer_id", "offset", "size", "sha256", "cache")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    offset: int
    size: int
    sha256: bytes
    cache: bool
    def __init__(self, buffer_id: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., cache: _Optional[bool] = ...) -> None: ...

class SetTensorChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SetTensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SetTensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetTensorReply(_message.Message):
    __slots__ = ("bytes_written",)
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    def __init__(self, bytes_written: _Optional[int] = ...) -> None: ...

class SetTensorFromCacheRequest(_message.Message):
    __slots__ = ("buffer_id", "offset", "size", "sha256")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    offset: int
    size: int
    sha256: bytes
    def __init__(self, buffer_id: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SetTensorFromCacheReply(_message.Message):
    __slots__ = ("hit",)
    HIT_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    def __init__(self, hit: _Optional[bool] = ...) -> None: ...

class GetTensorRequest(_message.Message):
    __slots__ = ("buffer_id", "offset", "size")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    buffer_id: int
    offset: int
    size: int
    def __init__(self, buffer_id: _Optional[int] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CopyTensorRequest(_message.Message):
    __slots__ = ("src_buffer_id", "src_offset", "dst_buffer_id", "dst_offset", "size")
    SRC_BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DST_BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    DST_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    src_buffer_id: int
    src_offset: int
    dst_buffer_id: int
    dst_offset: int
    size: int
    def __init__(self, src_buffer_id: _Optional[int] = ..., src_offset: _Optional[int] = ..., dst_buffer_id: _Optional[int] = ..., dst_offset: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class Attrs(_message.Message):
    __slots__ = ("eps", "scale", "head_dim", "n_dims", "rope_mode", "freq_base", "freq_scale", "n_head", "n_head_kv", "sliding_window", "softcap", "pooling", "non_causal")
    EPS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    N_DIMS_FIELD_NUMBER: _ClassVar[int]
    ROPE_MODE_FIELD_NUMBER: _ClassVar[int]
    FREQ_BASE_FIELD_NUMBER: _ClassVar[int]
    FREQ_SCALE_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_FIELD_NUMBER: _ClassVar[int]
    N_HEAD_KV_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NON_CAUSAL_FIELD_NUMBER: _ClassVar[int]
    eps: float
    scale: float
    head_dim: int
    n_dims: int
    rope_mode: int
    freq_base: float
    freq_scale: float
    n_head: int
    n_head_kv: int
    sliding_window: int
    softcap: float
    pooling: int
    non_causal: bool
    def __init__(self, eps: _Optional[float] = ..., scale: _Optional[float] = ..., head_dim: _Optional[int] = ..., n_dims: _Optional[int] = ..., rope_mode: _Optional[int] = ..., freq_base: _Optional[float] = ..., freq_scale: _Optional[float] = ..., n_head: _Optional[int] = ..., n_head_kv: _Optional[int] = ..., sliding_window: _Optional[int] = ..., softcap: _Optional[float] = ..., pooling: _Optional[int] = ..., non_causal: _Optional[bool] = ...) -> None: ...

class Dim(_message.Message):
    __slots__ = ("size", "symbol")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    size: int
    symbol: str
    def __init__(self, size: _Optional[int] = ..., symbol: _Optional[str] = ...) -> None: ...

class GraphInput(_message.Message):
    __slots__ = ("name", "type", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: int
    shape: _containers.RepeatedCompositeFieldContainer[Dim]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[int] = ..., shape: _Optional[_Iterable[_Union[Dim, _Mapping]]] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("type", "args", "attrs")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    type: OpType
    args: _containers.RepeatedScalarFieldContainer[int]
    attrs: Attrs
    def __init__(self, type: _Optional[_Union[OpType, str]] = ..., args: _Optional[_Iterable[int]] = ..., attrs: _Optional[_Union[Attrs, _Mapping]] = ...) -> None: ...

class GraphOutput(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("inputs", "tensors", "ops", "outputs")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[GraphInput]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorRef]
    ops: _containers.RepeatedCompositeFieldContainer[Op]
    outputs: _containers.RepeatedCompositeFieldContainer[GraphOutput]
    def __init__(self, inputs: _Optional[_Iterable[_Union[GraphInput, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorRef, _Mapping]]] = ..., ops: _Optional[_Iterable[_Union[Op, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[GraphOutput, _Mapping]]] = ...) -> None: ...

class RegisterGraphRequest(_message.Message):
    __slots__ = ("graph",)
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    graph: Graph
    def __init__(self, graph: _Optional[_Union[Graph, _Mapping]] = ...) -> None: ...

class RegisterGraphReply(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: int
    def __init__(self, graph_id: _Optional[int] = ...) -> None: ...

class ReleaseGraphRequest(_message.Message):
    __slots__ = ("graph_id",)
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    graph_id: int
    def __init__(self, graph_id: _Optional[int] = ...) -> None: ...

class Array(_message.Message):
    __slots__ = ("type", "shape", "data")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    type: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, type: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedArray(_message.Message):
    __slots__ = ("name", "array")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    name: str
    array: Array
    def __init__(self, name: _Optional[str] = ..., array: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("graph_id", "inputs")
    GRAPH_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    graph_id: int
    inputs: _containers.RepeatedCompositeFieldContainer[NamedArray]
    def __init__(self, graph_id: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ...) -> None: ...

class ComputeReply(_message.Message):
    __slots__ = ("outputs", "compute_seconds")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[NamedArray]
    compute_seconds: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[NamedArray, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...
