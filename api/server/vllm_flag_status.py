"""What `fornax serve` does with each of `vllm serve`'s flags: one status per flag (main process).

`STATUS` is the one table, one line a flag, under vLLM's group headings (`## Frontend`):

    NAME  STATUS [ACCEPT]  | note

STATUS is `implemented` (fornax's own flag of that name), `mapped` (onto the fornax setting the
note names), `no-op` (accepted; one start-up log line says why it has no meaning here) or
`refused` (exit 2 at start naming it and what is missing, unless given vLLM's default value, which
asks for nothing). ACCEPT narrows a no-op to the values that equal fornax's behaviour: `=A,B`
(compared without case) or `off` (false, 0 or empty); other values exit 2 like a refused flag.
vLLM's own list is api/server/vllm_serve_flags.json; tests/unit/test_vllm_flags.py fails when a
flag there has no line here, and README.md's flag table is `vllm_flags.markdown_table()`.
"""

from __future__ import annotations

STATUS = """
## options
--headless  refused | engines without API servers serve multi-node data parallel; fornax starts its API workers with its one engine core
--api-server-count  implemented | API worker processes on the one engine core
--config  implemented | a YAML file of flags; the command line wins
--grpc  refused | there is no gRPC server, only HTTP
--disable-log-stats  no-op | fornax writes no periodic stats lines; the numbers are on /metrics
--aggregate-engine-logging  no-op | one engine core: nothing to aggregate
--fail-on-environ-validation  no-op | fornax checks its own variables at start always (bad values stop it); VLLM_* tuning variables are not read
--shutdown-timeout  implemented | seconds of SIGTERM drain before in-flight requests are aborted
--gdn-prefill-backend  no-op | kernel choice for Gated DeltaNet layers, a model family fornax does not run
--kda-prefill-backend  no-op | kernel choice for Kimi delta attention, a model family fornax does not run
--kda-decode-backend  no-op | kernel choice for Kimi delta attention, a model family fornax does not run
--enable-log-requests  implemented | one log line per request (on by default; --disable-log-requests)
## Frontend
--lora-modules  refused | LoRA adapters are not supported yet
--chat-template  implemented | a template file or text replacing the model's
--chat-template-content-format  implemented | message content as a string or as OpenAI parts
--trust-request-chat-template  implemented | requests may bring their own chat_template
--trust-request-mm-kwargs  no-op | there is no multimodal input here, so no multimodal kwargs to trust
--default-chat-template-kwargs  implemented | template variables for every chat request; a request's own chat_template_kwargs win
--reasoning-effort-map  refused | reasoning_effort reaches the template as sent; rewriting it is not supported
--response-role  no-op =assistant | chat answers always carry the role assistant
--return-tokens-as-token-ids  refused | logprob tokens as token_id:N strings are not supported
--enable-auto-tool-choice  implemented | the model decides when to call tools
--exclude-tools-when-tool-choice-none  refused | tools are always rendered into the prompt, also with tool_choice none
--tool-call-parser  implemented | how the model writes tool calls
--tool-parser-plugin  implemented | a Python file registering tool parsers
--tool-strict-level  refused | strict tools are forced by grammar per tool; a server-wide level is not supported
--tool-server  refused | there are no built-in tool servers (MCP or demo tools)
--max-log-len  no-op | request log lines hold counts and sampling settings, never prompt text to shorten
--enable-prompt-tokens-details  no-op | usage.prompt_tokens_details.cached_tokens is always reported, whatever this says
--enable-per-request-metrics  refused | per-request metrics in responses are not supported
--enable-server-load-tracking  no-op | GET /load always reports the load
--enable-force-include-usage  refused | usage on every stream without stream_options is not supported
--sse-keep-alive-interval  no-op =0 | streams send no keep-alive comments
--enable-tokenizer-info-endpoint  implemented | serve /tokenizer_info and /get_tokenizer_info
--enable-log-outputs  refused | logging generated text is not supported
--enable-log-deltas  no-op | only with --enable-log-outputs, which is refused
--cohere-is-reasoning-model  no-op | tunes Cohere's API, which fornax does not serve
--cohere-format  no-op | tunes Cohere's API, which fornax does not serve
--anthropic-disabled-thinking-effort  no-op =auto | /v1/messages with thinking disabled only turns enable_thinking off
--log-error-stack  no-op | internal errors are logged with their stack always
--tokens-only  refused | a token-only server without a tokenizer is not supported
--enable-scale-out  refused | scale-out serving is not supported
--fingerprint-mode  no-op | responses carry no system_fingerprint
--fingerprint-value  no-op | responses carry no system_fingerprint
--host  implemented | address to bind
--port  implemented | port to bind
--grpc-port  refused | there is no gRPC server
--data-parallel-supervisor-port  no-op | no data-parallel supervisor: one engine core
--dp-supervisor-probe-interval-s  no-op | no data-parallel supervisor: one engine core
--dp-supervisor-probe-timeout-s  no-op | no data-parallel supervisor: one engine core
--dp-supervisor-probe-failure-threshold  no-op | no data-parallel supervisor: one engine core
--uds  implemented | serve on a Unix domain socket
--uvicorn-log-level  no-op | the HTTP server is Granian, whose lines follow --log-level
--disable-uvicorn-access-log  no-op | Granian writes no access log; per-request lines are --disable-log-requests
--disable-access-log-for-endpoints  no-op | Granian writes no access log
--allow-credentials  refused | CORS answers never allow credentials
--allowed-origins  implemented | CORS origins
--allowed-methods  no-op =* | CORS allows every method of fornax's routes
--allowed-headers  no-op =* | CORS allows the headers a preflight asks for
--api-key  implemented | bearer keys required on the API routes
--ssl-keyfile  implemented | TLS key (needs --ssl-certfile)
--ssl-certfile  implemented | TLS certificate (needs --ssl-keyfile)
--ssl-ca-certs  refused | client certificates are not checked
--enable-ssl-refresh  refused | certificates are read once at start
--ssl-cert-reqs  no-op =0 | client certificates are never required
--ssl-ciphers  refused | the cipher list is Granian's own
--root-path  refused | serving under a path prefix is not supported
--middleware  refused | the API is not FastAPI: there is no middleware to import
--enable-request-id-headers  no-op | X-Request-Id is always echoed
--disable-fastapi-docs  implemented | no /docs and no /openapi.json
--h11-max-incomplete-event-size  no-op | Granian parses HTTP with its own bounds; bodies are bounded by --max-request-body-bytes
--h11-max-header-count  no-op | Granian parses HTTP with its own bounds
--enable-offline-docs  implemented | accepted: /docs never loads anything from outside anyway
--enable-flash-late-interaction  no-op | a late-interaction (ColBERT) kernel choice; no such models here
## ModelConfig
--model  implemented | same as the positional MODEL
--runner  implemented | generate or pooling
--convert  no-op =auto,none | turning a generative model into a pooling one is not supported
--tokenizer  implemented | another tokenizer folder or cached hub id
--tokenizer-mode  no-op =auto,hf | tokenizers come from tokenizer.json (Hugging Face tokenizers)
--trust-remote-code  no-op | fornax never runs code shipped with a model
--dtype  implemented | weights and activations dtype
--seed  implemented | engine random seed
--hf-config-path  refused | the config is always the model folder's config.json
--allowed-local-media-path  no-op | chat takes no image or video URLs
--allowed-media-domains  no-op | chat takes no image or video URLs
--revision  implemented | a cached hub id's branch, tag or commit
--code-revision  no-op | no remote code is ever run
--tokenizer-revision  implemented | --tokenizer's branch, tag or commit
--max-model-len  implemented | context length (auto or -1: the model's)
--quantization  implemented | gguf: GGUF weights stay quantized; other methods are refused
--quantization-config  refused | quantization settings beyond GGUF are not supported
--allow-deprecated-quantization  no-op | only GGUF quantization, which is not deprecated
--enforce-eager  implemented | no torch.compile, no CUDA graphs
--enable-return-routed-experts  refused | MoE routing output is not supported
--return-sampling-mask  refused | sampling masks in the output are not supported
--max-logprobs  implemented | most logprobs a request may ask for
--logprobs-mode  no-op =raw_logprobs | logprobs are always those of the model's raw output, before any sampling processing
--use-fp64-gumbel  no-op | the sampler's own numerics
--enable-trace-replay  refused | trace replay is not supported
--disable-sliding-window  refused | sliding-window models always use their window
--disable-cascade-attn  no-op | there is no cascade attention to turn off
--skip-tokenizer-init  refused | the API workers always need the tokenizer
--enable-prompt-embeds  refused | prompts as embeddings are not supported
--served-model-name  implemented | names the model answers to
--config-format  no-op =auto,hf | configs are read from config.json
--hf-token  no-op | fornax never contacts a hub: models load from disk or the local cache
--hf-overrides  refused | overriding the model config is not supported
--model-class-overrides  refused | model classes come from fornax's own registry
--pooler-config  implemented | pooling settings
--generation-config  implemented | sampling defaults from the model or fornax
--override-generation-config  refused | overriding generation defaults is not supported
--enable-sleep-mode  implemented | sleep is always available through the dev endpoints
--sleep-mode-backend  no-op | sleep frees memory its own way
--sleep-mode-offload-cudagraph  no-op | sleep frees memory its own way
--sleep-preserve-parameter-names  no-op | sleep frees memory its own way
--enable-cumem-allocator  no-op | the allocator is PyTorch's own
--enable-nccl-comm-suspend  no-op | no NCCL: one device
--model-impl  no-op =auto,vllm | models are fornax's own classes; the transformers backend is not available
--logits-processors  refused | custom logits-processor classes are not supported
--io-processor-plugin  refused | IO processor plugins are not supported
--renderer-num-workers  no-op | templates render in the API workers (--api-server-count)
## LoadConfig
--load-format  implemented | safetensors, gguf or dummy weights
--download-dir  implemented | a Hugging Face cache folder searched first
--safetensors-load-strategy  no-op | safetensors files are memory-mapped
--safetensors-prefetch-num-threads  no-op | safetensors files are memory-mapped
--safetensors-prefetch-block-size  no-op | safetensors files are memory-mapped
--model-loader-extra-config  refused | loader plugins are not supported
--ignore-patterns  no-op | nothing is downloaded, so nothing to skip
--use-tqdm-on-load  no-op | loading shows no progress bar
--pt-load-map-location  no-op | .bin/.pt checkpoints are not read
## AttentionConfig
--attention-backend  mapped | vLLM names map onto fornax's backends: FLASHINFER -> flashinfer, CPU_ATTN -> cpu_paged, TORCH_SDPA -> torch_ref; others exit 2
## MambaConfig
--mamba-backend  no-op | no Mamba models here
--mamba-ssu-algorithm  no-op | no Mamba models here
--enable-mamba-cache-stochastic-rounding  no-op | no Mamba models here
--mamba-cache-philox-rounds  no-op | no Mamba models here
## StructuredOutputsConfig
--reasoning-parser  implemented | splits the thinking into reasoning
--reasoning-parser-plugin  refused | reasoning parser plugins are not supported
## ParallelConfig
--distributed-executor-backend  no-op | one engine-core process on one device: no executor to choose
--pipeline-parallel-size  no-op =1 | no pipeline parallelism: one device
--master-addr  no-op | one node
--master-port  no-op | one node
--nnodes  no-op =1 | one node
--node-rank  no-op =0 | one node
--distributed-timeout-seconds  no-op | no distributed group
--cpu-distributed-timeout-seconds  no-op | no distributed group
--numa-bind  no-op | threads are not pinned to NUMA nodes
--numa-bind-nodes  no-op | threads are not pinned to NUMA nodes
--numa-bind-cpus  no-op | threads are not pinned to NUMA nodes
--device-ids  refused | pick the GPU with CUDA_VISIBLE_DEVICES
--tensor-parallel-size  implemented | only 1 (one device)
--decode-context-parallel-size  no-op =1 | no context parallelism: one device
--dcp-comm-backend  no-op | no context parallelism
--dcp-q-replicate  no-op | no context parallelism
--dcp-kv-cache-interleave-size  no-op | no context parallelism
--cp-kv-cache-interleave-size  no-op | no context parallelism
--prefill-context-parallel-size  no-op =1 | no context parallelism: one device
--data-parallel-size  no-op =1 | no data parallelism: one engine core
--data-parallel-rank  no-op =0 | no data parallelism: one engine core
--data-parallel-start-rank  no-op =0 | no data parallelism: one engine core
--data-parallel-size-local  no-op =1 | no data parallelism: one engine core
--data-parallel-address  no-op | no data parallelism
--data-parallel-rpc-port  no-op | no data parallelism
--data-parallel-backend  no-op | no data parallelism
--data-parallel-hybrid-lb  no-op off | no data parallelism
--data-parallel-external-lb  no-op off | no data parallelism
--data-parallel-multi-port-external-lb  no-op off | no data parallelism
--enable-hc-sp  no-op off | no sequence parallelism: one device
--enable-expert-parallel  no-op | one device holds every expert
--enable-batch-sharded-sampling  no-op | one device samples the whole batch
--enable-ep-weight-filter  no-op | one device holds every expert
--all2all-backend  no-op | one device: no all-to-all
--enable-dbo  no-op | no dual-batch overlap (a multi-device optimisation)
--enable-shm-tensor-arena  no-op | one engine-core process
--ubatch-size  no-op | no micro-batching
--enable-elastic-ep  no-op off | one device
--elastic-ep-max-dp-size  no-op | one device
--dbo-decode-token-threshold  no-op | no dual-batch overlap
--dp-sync-interval  no-op | no data parallelism
--dbo-prefill-token-threshold  no-op | no dual-batch overlap
--disable-nccl-for-dp-synchronization  no-op | no data parallelism
--enable-eplb  no-op | one device holds every expert
--eplb-config  no-op | one device holds every expert
--expert-placement-strategy  no-op | one device holds every expert
--max-parallel-loading-workers  no-op | one process loads the weights
--ray-workers-use-nsight  no-op | no Ray
--disable-custom-all-reduce  no-op | one device: no all-reduce
--worker-cls  no-op =auto | the model runner is fornax's own
--worker-extension-cls  refused | worker extensions are not supported
--enable-fault-tolerance  refused | engine recovery is not supported: an engine death stops the server
--fault-tolerance-config  no-op | only with --enable-fault-tolerance, which is refused
## CacheConfig
--block-size  implemented | tokens per KV block
--gpu-memory-utilization  implemented | fraction of GPU memory for weights and KV cache
--kv-cache-memory-bytes  implemented | KV-cache size
--kv-cache-dtype  no-op =auto | the KV cache is kept in the model dtype
--num-gpu-blocks-override  implemented | a fixed number of KV blocks
--enable-prefix-caching  implemented | reuse KV blocks of shared prefixes
--prefix-caching-hash-algo  no-op | blocks are hashed fornax's own way (chained hashes)
--prefix-cache-retention-interval  no-op | freed prefix blocks are kept until needed (LRU)
--kv-cache-dtype-skip-layers  no-op | the KV cache is kept in the model dtype
--kv-sharing-fast-prefill  no-op | no cross-layer KV sharing models here
--swa-bounded-replay  no-op | a hybrid-model cache tuning
--mamba-cache-dtype  no-op | no Mamba models here
--mamba-ssm-cache-dtype  no-op | no Mamba models here
--mamba-block-size  no-op | no Mamba models here
--prefix-match-unit  no-op | prefixes match in whole KV blocks
--mamba-cache-mode  no-op | no Mamba models here
--enable-mamba-shared-prefix-checkpoint  no-op | no Mamba models here
--replayssm-buffer-len  no-op | no Mamba models here
--use-replayssm  no-op | no Mamba models here
--kv-offloading-size  refused | KV-cache offloading to CPU memory is not supported
--kv-offloading-backend  no-op | only with --kv-offloading-size, which is refused
## OffloadConfig
--offload-backend  no-op | weights are never offloaded
--cpu-offload-gb  no-op =0 | weights are never offloaded to CPU memory
--cpu-offload-params  refused | weight offloading is not supported
--offload-group-size  no-op | weights are never offloaded
--offload-num-in-group  no-op | weights are never offloaded
--offload-prefetch-step  no-op | weights are never offloaded
--offload-params  refused | weight offloading is not supported
## MultiModalConfig
--language-model-only  no-op | only language models (and Whisper) are loaded
--limit-mm-per-prompt  no-op | prompts take no images or videos
--enable-mm-embeds  refused | multimodal embeddings are not supported
--media-io-kwargs  no-op | no image or video loading
--mm-processor-kwargs  no-op | no multimodal processor
--mm-processor-cache-gb  no-op | no multimodal processor
--mm-processor-cache-type  no-op | no multimodal processor
--mm-hasher-algorithm  no-op | no multimodal processor
--mm-shm-cache-max-object-size-mb  no-op | no multimodal processor
--mm-encoder-only  refused | encoder-only multimodal serving is not supported
--mm-encoder-tp-mode  no-op | no multimodal encoder
--mm-encoder-attn-backend  no-op | no multimodal encoder
--mm-encoder-attn-dtype  no-op | no multimodal encoder
--mm-encoder-fp8-scale-path  no-op | no multimodal encoder
--mm-encoder-fp8-scale-save-path  no-op | no multimodal encoder
--mm-encoder-fp8-scale-save-margin  no-op | no multimodal encoder
--interleave-mm-strings  no-op | no multimodal input
--skip-mm-profiling  no-op | no multimodal encoder to profile
--video-pruning-rate  no-op | no video input
--video-pruning-method  no-op | no video input
--mm-tensor-ipc  no-op | no multimodal input
--mm-processor-device  no-op | no multimodal processor
--mm-ipc-gpu-memory-gb  no-op | no multimodal input
--mm-device-do-normalize  no-op | no multimodal processor
## LoRAConfig
--enable-lora  refused | LoRA adapters are not supported yet
--max-loras  no-op | only with --enable-lora, which is refused
--max-lora-rank  no-op | only with --enable-lora, which is refused
--lora-dtype  no-op | only with --enable-lora, which is refused
--enable-tower-connector-lora  no-op | only with --enable-lora, which is refused
--max-cpu-loras  no-op | only with --enable-lora, which is refused
--fully-sharded-loras  no-op | only with --enable-lora, which is refused
--lora-target-modules  no-op | only with --enable-lora, which is refused
--default-mm-loras  no-op | only with --enable-lora, which is refused
--specialize-active-lora  no-op | only with --enable-lora, which is refused
--enable-mixed-moe-lora-format  no-op | only with --enable-lora, which is refused
--enable-moe-shared-loras  no-op | only with --enable-lora, which is refused
--max-lora-cls-labels  no-op | only with --enable-lora, which is refused
## LoggingConfig
--logging-config  refused | logging is configured by --log-level only
--log-level  implemented | log level of every fornax process
--log-config-file  refused | logging is configured by --log-level only
## ObservabilityConfig
--show-hidden-metrics-for-version  no-op | no metric is hidden
--otlp-traces-endpoint  refused | OpenTelemetry tracing is not supported
--collect-detailed-traces  refused | OpenTelemetry tracing is not supported
--per-request-spec-decode-metrics  no-op =none | no speculative decoding
--kv-cache-metrics  refused | KV-block residency metrics are not exported
--kv-cache-metrics-sample  no-op | only with --kv-cache-metrics, which is refused
--custom-histogram-buckets  refused | histogram buckets are vLLM's defaults, fixed
--cudagraph-metrics  refused | CUDA-graph metrics are not exported
--enable-layerwise-nvtx-tracing  no-op | no NVTX ranges are emitted
--enable-mfu-metrics  refused | model-FLOPs-utilisation metrics are not exported
--enable-logging-iteration-details  refused | per-step detail logging is not supported
--jit-monitor-mode  no-op | no JIT monitor
--jit-monitor-verbose  no-op | no JIT monitor
## SchedulerConfig
--max-num-batched-tokens  implemented | token budget of one step
--max-num-scheduled-tokens  refused | a scheduled-token budget apart from --max-num-batched-tokens is not supported
--max-num-seqs  implemented | most requests in one batch
--max-num-active-seqs  refused | a separate bound on active requests is not supported
--max-num-queued-reqs  implemented | requests in flight (waiting + running); beyond it 503
--max-num-queued-tokens  implemented | prompt tokens of waiting requests; beyond it 503
--long-prefill-token-threshold  implemented | most prompt tokens one request prefills in a step
--long-prefill-token-threshold-adaptive  refused | a per-request prefill chunk bound is not supported
--scheduling-policy  implemented | fcfs or priority
--enable-chunked-prefill  implemented | split long prompts over steps
--disable-chunked-mm-input  no-op | no multimodal input
--scheduler-cls  refused | the scheduler is fornax's own
--scheduler-reserve-full-isl  no-op | admission is bounded by --max-num-queued-reqs/-tokens instead
--watermark  no-op | the scheduler keeps no KV watermark
--prefill-schedule-interval  no-op =1 | prefills are scheduled at every step
--disable-hybrid-kv-cache-manager  no-op | one KV-cache manager for every model here
--async-scheduling  no-op | steps are scheduled fornax's own way
--stream-interval  no-op =1 | streams send every token as it comes
## CompilationConfig
--cudagraph-capture-sizes  implemented | batch sizes captured in CUDA graphs (old name --cuda-graph-sizes)
--max-cudagraph-capture-size  implemented | largest batch captured in a CUDA graph
## KernelConfig
--ir-op-priority  no-op | kernels are fornax's own
--enable-flashinfer-autotune  no-op | FlashInfer runs with its defaults
--monokernel  no-op | kernels are fornax's own
--moe-backend  no-op | kernels are fornax's own
--linear-backend  no-op | linear layers choose their kernels themselves (FORNAX_CPU_LINEAR on CPU)
--sparse-indexer-topk-backend  no-op | no sparse-attention models here
## VllmConfig
--speculative-config  refused | speculative decoding is not supported yet
--spec-method  refused | speculative decoding is not supported yet
--spec-model  refused | speculative decoding is not supported yet
--spec-tokens  refused | speculative decoding is not supported yet
--watermark-config  refused | output watermarking is not supported
--diffusion-config  refused | diffusion models are not supported
--kv-transfer-config  refused | disaggregated prefill (KV transfer) is not supported
--kv-events-config  refused | KV-cache events are not published
--ec-transfer-config  refused | encoder-cache transfer is not supported
--ec-manager-config  no-op | no encoder cache
--compilation-config  mapped | mode 0 -> --enforce-eager, cudagraph_capture_sizes and max_cudagraph_capture_size -> the flags of those names; other keys are logged as no-ops
--attention-config  mapped | backend -> --attention-backend; other keys are logged as no-ops
--engram-config  refused | engram memory is not supported
--reasoning-config  refused | reasoning settings come from --reasoning-parser only
--kernel-config  no-op | kernels are fornax's own
--additional-config  no-op | no platform plugins read it
--structured-outputs-config  no-op | structured output always uses xgrammar, bounded by the --grammar-* flags
--aux-output-config  no-op | no auxiliary outputs
--profiler-config  refused | the built-in profiler is not supported (fornax bench profiles)
--watchdog-config  no-op | the engine watchdog is --engine-stall-timeout
--optimization-level  mapped | -O0 -> --enforce-eager; -O1, -O2, -O3 -> fornax's default (compiled with CUDA graphs on GPU, eager on CPU)
--performance-mode  no-op | one tuning for every workload
--weight-transfer-config  refused | weight updates while serving are not supported
"""
