"""One request's failure while being served: the record, its client-facing error (engine core)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from fornax.runtime.engine.messages import EngineCoreOutput

# Text of torch errors after which the device (its CUDA context) cannot be trusted any more.
_DEVICE_ERROR_MARKERS = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "CUDNN_STATUS",
                         "cuDNN error", "NCCL error", "illegal memory access",
                         "unspecified launch failure")
_STAGE_WORDS = {
    "admit": "being admitted", "schedule": "being scheduled",
    "prepare": "preparing its sampling state", "grammar": "applying its output grammar",
    "sample": "sampling", "stop_check": "checking its stop conditions",
    "output": "building its output", "runner": "running its step",
    "step": "running the step it was part of",
}


@dataclass
class RequestFailure:
    """Request `request_id` failed at `stage`; `batch`: the whole step failed, not the request."""

    request_id: str
    stage: str
    error: BaseException
    batch: bool = False
    num_prompt_tokens: int = 0


def is_device_error(exc: BaseException) -> bool:
    """A torch accelerator error: the device state is lost, so the engine process must end.

    A CUDA out-of-memory error is not one: the failed step's requests are freed and the engine
    goes on (repeated failures still end it, see engine_core_base)."""
    torch = sys.modules.get("torch")  # never imported here: scheduler and API stay torch-free
    if torch is not None:
        oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
        if oom is not None and isinstance(exc, oom):
            return False
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_ERROR_MARKERS)


def failure_output(failure: RequestFailure) -> EngineCoreOutput:
    """The request's last output: finish_reason "error", 400 when its own parameters were at
    fault (RequestError / ValueError raised on its behalf), else 500; the message names it."""
    rid, exc = failure.request_id, failure.error
    param = None
    if failure.batch:
        status = 500
        message = (f"request {rid} failed: the engine step it was part of failed "
                   f"({type(exc).__name__}: {exc}); the server goes on")
    elif isinstance(exc, ValueError):  # RequestError is a ValueError
        status, param = 400, getattr(exc, "param", None)
        message = f"request {rid} is invalid: {exc}"
    else:
        status = 500
        words = _STAGE_WORDS.get(failure.stage, failure.stage)
        message = (f"request {rid} failed while {words}: {type(exc).__name__}: {exc}; "
                   "the server goes on")
    return EngineCoreOutput(rid, [], finish_reason="error", num_prompt_tokens=
                            failure.num_prompt_tokens, error=message, error_status=status,
                            error_param=param)
