"""Every message between the API workers and the engine core, as msgspec structs (any process)."""

from __future__ import annotations

import msgspec

from fornax.runtime.engine.contract import RunnerType
from fornax.runtime.sampling.params import SamplingParams


class EncoderInput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The encoder side of an encoder-decoder request (Whisper: a log-mel window of at most 30 s)."""

    data: bytes  # float32 little-endian, C order, of `shape`
    shape: list[int]  # [num_mel_bins, frames]: up to one window; fewer frames encode faster
    content_frames: int = 0  # frames holding audio (the rest is padding); 0 = all of them
    detect_language: bool = False  # the first output token is the language the model hears
    forced_token_ids: list[int] = []  # output tokens forced after the detected language
    return_alignment: bool = False  # word timing: see EngineCoreOutput.alignment


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A tokenized request, ready for the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None  # set on the n > 1 children of one user request
    pooling_params: PoolingParams | None = None  # set on requests to a pooling model
    token_type_ids: list[int] | None = None  # BERT segment ids (cross-encoder pairs)
    encoder_input: EncoderInput | None = None  # set on requests to an encoder-decoder model


class TokenLogprobs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Logprobs for one generated token: the sampled id first, then the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


class RequestTimings(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Where a finished request spent its time in the engine, in seconds (vLLM's phases):
    waiting until first scheduled, scheduled to first token (prefill), first to last token
    (decode), scheduled to last token (inference)."""

    queued_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    inference_s: float = 0.0


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one step produced for one request: new tokens, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    # logprobs of prompt positions computed this step; entry i is for prompt token
    # `prompt_logprobs_start + i` (the first prompt token never has one)
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_start: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    pooled: PoolingOutput | None = None  # a pooling request's result (it finishes in one step)
    # encoder-decoder requests with `return_alignment`: at finish, the start frame (20 ms units)
    # of each output token that is text or the final end-of-text, -1 for the others
    alignment: list[int] | None = None
    no_speech_prob: float | None = None  # Whisper: P(<|nospeech|>) at <|startoftranscript|>
    # finish_reason "error": the request failed while being served (`error` says why); the
    # engine-core process sends it to the API worker as a RequestRejected of this status/param
    error_status: int = 500
    error_param: str | None = None
    timings: RequestTimings | None = None  # on the output that finishes the request


# ---- engine-core process <-> API workers (fornax serve) ---------------------------------------
# Client -> engine messages are one tagged union (`ClientMessage`), engine -> client another
# (`EngineMessage`); the tag is the first array element.


class EngineHandshake(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Sent once by the engine-core process at start: READY with its limits, or the failure."""

    ready: bool
    error: str | None = None
    num_kv_blocks: int = 0
    block_size: int = 0
    kv_capacity_tokens: int = 0
    max_model_len: int = 0
    vocab_size: int = 0
    model_path: str = ""
    architecture: str = ""
    dtype: str = ""
    device: str = ""
    max_logprobs: int = 0
    eos_token_ids: list[int] = []
    runner: RunnerType = "generate"  # the routes the API serves (core.runner_type)
    pooling: PoolingModelInfo | None = None  # what a pooling model serves, and how it pools
    max_num_queued_reqs: int = 0  # admission bound in force (in-flight requests)
    max_num_queued_tokens: int = 0  # admission bound on waiting prompt tokens (0: none)
    tokenizer_path: str = ""  # --tokenizer's folder; empty: the model's (model_path)


class ClientHello(msgspec.Struct, tag="hello", array_like=True, omit_defaults=True, gc=False):
    """An API worker announces itself and the address its results go to."""

    client_id: str
    output_address: str


class AddRequest(msgspec.Struct, tag="add", array_like=True, omit_defaults=True, gc=False):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, omit_defaults=True, gc=False):
    request_ids: list[str]


class StatsQuery(msgspec.Struct, tag="stats?", array_like=True, omit_defaults=True, gc=False):
    query_id: int


class AdminCommand(msgspec.Struct, tag="admin?", array_like=True, omit_defaults=True, gc=False):
    """A dev-endpoint operation run in the busy loop: sleep (with `level`), wake_up,
    is_sleeping, reset_prefix_cache. Answered with an AdminResult of the same query id."""

    query_id: int
    command: str
    level: int = 1


ClientMessage = ClientHello | AddRequest | AbortRequests | StatsQuery | AdminCommand


class EngineStats(msgspec.Struct, tag="stats", array_like=True, omit_defaults=True, gc=False):
    """Engine-wide gauges and counters, answered to a StatsQuery (for /metrics and /load)."""

    query_id: int
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    draining: bool = False
    num_iterations: int = 0  # busy-loop iterations so far (the watchdog's progress counter)
    loop_stall_s: float = 0.0  # seconds since the busy loop last came round (a long step shows)
    num_rejected_overload: int = 0  # requests refused with 503 by the admission bounds
    # tokens per engine step: counts per ITERATION_TOKENS_BUCKETS slot (+Inf last), their sum
    iteration_tokens_counts: list[int] = []
    iteration_tokens_sum: int = 0
    sleep_level: int = 0  # 0 awake, else the sleep level (1: weights offloaded, 2: discarded)


class RequestRejected(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The engine refused a request: `status` 400 (bad input) or 503 (overloaded / draining)."""

    request_id: str
    message: str
    param: str | None = None
    status: int = 400


class EngineCoreOutputs(msgspec.Struct, tag="out", array_like=True, omit_defaults=True, gc=False):
    """One step's results for one API worker."""

    outputs: list[EngineCoreOutput] = []
    rejected: list[RequestRejected] = []


class EngineDead(msgspec.Struct, tag="dead", array_like=True, omit_defaults=True, gc=False):
    """The dead sentinel: the engine core failed and every in-flight request is lost."""

    message: str


class AdminResult(msgspec.Struct, tag="admin", array_like=True, omit_defaults=True, gc=False):
    """The outcome of an AdminCommand: `status` 200, or the HTTP status of the refusal."""

    query_id: int
    status: int = 200
    message: str = ""
    is_sleeping: bool = False
    value: bool = True  # reset_prefix_cache: whether the cache was reset


EngineMessage = EngineCoreOutputs | EngineStats | EngineDead | AdminResult


# ---- many-model servers: API worker <-> `fornax serve`'s model manager ------------------------
class ModelCommand(msgspec.Struct, tag="model?", array_like=True, omit_defaults=True, gc=False):
    """What a worker asks of the model manager: `ensure` (a request starts: load the model if
    needed, answer once it is READY; it stays busy until the request's `end`), `load`,
    `unload`, `status`, `cancel` (all answered; cancel withdraws the `ensure` or `load` of the
    same query id, answered "cancelled"), or `end` (not answered; it carries the request's
    keep_alive: seconds to stay loaded, -1 forever)."""

    query_id: int
    op: str
    model: int = -1  # index in ServerSettings.models
    keep_alive_s: float | None = None


class ModelStates(msgspec.Struct, tag="models", array_like=True, omit_defaults=True, gc=False):
    """The manager's answer: each model's state (loaded, loading, unloading, unloaded, failed,
    sleeping, asleep, waking); an `error` that is `lasting` (a model larger than the memory
    budget) is no matter of waiting (no Retry-After)."""

    query_id: int
    states: list[str]
    error: str = ""
    lasting: bool = False


class EngineSpec(msgspec.Struct, omit_defaults=True, gc=False):
    """How `fornax serve` tells the engine-core process what to load and where to listen (JSON)."""

    model: str
    engine_kwargs: dict[str, object]
    ipc_dir: str
    handshake_address: str
    parent_pid: int
    drain_timeout_s: float = 20.0


# ---- pooling models (embeddings, classification, scores) ------------------------------------


class PoolingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """How a pooling request turns hidden states into its output (filled in by the front end)."""

    task: str = "embed"  # embed | classify | score | encode (the model's raw pooled output)
    dimensions: int | None = None  # Matryoshka: keep the first `dimensions` values
    normalize: bool | None = None  # embed: L2-normalize (None: the model's default)
    activation: bool = True  # classify / score: softmax (sigmoid for one label) over the logits


class PoolingOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One pooled vector (or matrix) as float32 little-endian bytes with its shape."""

    data: bytes
    shape: list[int]


class PoolingModelInfo(msgspec.Struct, omit_defaults=True, gc=False):
    """A pooling model's capabilities, decided in the engine and reported in the handshake."""

    architecture: str
    family: str  # "encoder" (BERT-like, bidirectional) or "decoder" (causal, Llama-like)
    head: str  # "embed" or "classify"
    tasks: list[str]
    pooling_type: str  # CLS | MEAN | MAX | LAST | MEAN_SQRT_LEN
    normalize: bool
    hidden_size: int
    max_model_len: int
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] = []
    labels: list[str] = []  # classify: id2label in index order
    truncation_side: str = "right"
    prompts: dict[str, str] = {}  # sentence-transformers prompts by name (query, document, ...)
