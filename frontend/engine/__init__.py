"""Running a model: `loader` loads one (its `model/` parts plus the `pipeline` that places its
layer ranges on backends by `placement` and steps them, micro-batch by micro-batch), `kv_cells`
keeps the KV-cache bookkeeping, and `engine` is the one loop that owns the model: slots
(`slot`), continuous batching under a step budget (`budget`), stop strings (`text`), tasks and
their events (`task`), `n` > 1 choices sharing one prefill (`fork`), an echoed prompt's
logprobs (`prompt_probs`). Every generation goes through it: the HTTP API and the one-shot CLI submit
tasks and read their events. `probe` gives the logits of a token sequence for fidelity checks.
The engine builds on `model/` and `sampling/`; it knows no HTTP and no command line."""
from .engine import Engine, EngineConfig, EngineMetrics
from .loader import Model, load_model
from .probe import LogitsProbe
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

__all__ = ["Engine", "EngineConfig", "EngineMetrics", "Model", "load_model", "LogitsProbe", "Task", "TaskParams",
           "Event", "PartialEvent", "FinalEvent", "ErrorEvent", "Timings", "TokenOutput", "TokenProb", "STOP_EOS",
           "STOP_WORD", "STOP_LIMIT"]
