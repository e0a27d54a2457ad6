"""tpserve: a ZeroMQ proxy in front of tensor-parallel MPI workers running an overlap loop."""

from tpserve.errors import EngineBusyError, EngineDeadError, ModelNotFoundError, WorkerStartupError
from tpserve.proxy.llm import LLM
from tpserve.proxy.outputs import RequestMetrics, RequestOutput, StreamChunk
from tpserve.sampling_params import SamplingParams
from tpserve.structured_outputs import StructuredOutputs

__all__ = [
    "LLM",
    "EngineBusyError",
    "EngineDeadError",
    "ModelNotFoundError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "StreamChunk",
    "StructuredOutputs",
    "WorkerStartupError",
]
