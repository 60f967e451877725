"""The serving engine: slots over one shared KV cache, continuous batching, one loop thread."""
from .engine import Engine, EngineConfig, EngineMetrics
from .task import (
                   STOP_EOS,
                   STOP_LIMIT,
                   STOP_WORD,
                   ErrorEvent,
                   Event,
                   FinalEvent,
                   PartialEvent,
                   Task,
                   TaskParams,
                   Timings,
                   TokenOutput,
                   TokenProb,
)

__all__ = ["Engine", "EngineConfig", "EngineMetrics", "Task", "TaskParams", "Event", "PartialEvent", "FinalEvent",
           "ErrorEvent", "Timings", "TokenOutput", "TokenProb", "STOP_EOS", "STOP_WORD", "STOP_LIMIT"]
