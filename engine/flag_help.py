"""The help text of `lockstep`'s flags, by config field: engine/cli.py builds the flags from the
typed configs and takes each one's help from here."""

ENGINE_HELP = {
    "model_dir": "checkpoint directory laid out like kyutai/moshiko-pytorch-bf16",
    "hf_repo": "Hugging Face repo id (e.g. kyutai/moshiko-pytorch-bf16); works offline from its cache",
    "moshi_weight": "override the Moshi LM safetensors file",
    "mimi_weight": "override the Mimi safetensors file",
    "tokenizer": "override the sentencepiece text tokenizer",
    "config_path": "override config.json",
    "lora_weight": "a LoRA fine-tune's adapter (safetensors, kyutai's moshi-finetune layout), folded into the LM "
                   "weights at load; config.json's lora_scaling applies (default 2.0)",
    "device": "auto (cuda when torch sees a GPU, else cpu), cpu or cuda[:N]",
    "dtype": "LM weights/activations dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or "
             "float32 (Mimi always runs in float32)",
    "max_sessions": "number of session slots stepped together; 0: as many as the device's free memory holds "
                    "at full context (up to 128)",
    "kernels": "kernel family: auto (Triton on CUDA, torch elsewhere), torch or triton",
    "batch_invariant": "make a session's output bit-identical whatever shares its batch: every tick steps "
                       "--max-sessions rows (the free ones padded), attends over whole rings and samples "
                       "over the whole vocabulary, so each tick costs a full batch's work",
    "kv_policy": "how sessions get pages of the LM's KV pool: reserve (each admitted session holds its whole "
                 "context; tokens as with a ring) or elastic (each is promised --kv-min-seconds and grows while "
                 "pages are free; when none are, its attention window stops growing); see docs/kv.md",
    "kv_min_seconds": "elastic: the context (seconds) every admitted session is promised; callers the pool "
                      "cannot promise it are refused (503)",
    "kv_dtype": "the LM's KV cache: auto (the LM's dtype), bf16, fp16, fp32 or fp8 (e4m3 with a power-of-two "
                "scale per position and head: half of bf16's memory)",
    "kv_pages": "pages in the KV pool; 0: as many as the device's free memory holds (reserve: what the slots need)",
    "kv_page_size": "positions (80 ms frames) per KV page",
}

SAMPLING_HELP = {
    "greedy": "argmax everywhere (no sampling)",
    "temperature": "audio sampling temperature",
    "top_k": "audio top-k (0 = whole vocabulary)",
    "text_temperature": "text sampling temperature",
    "text_top_k": "text top-k (0 = whole vocabulary)",
    "seed": "seed for sampling; each session derives its own seed from it",
}

# Unset, a sampling flag takes the checkpoint's setting: config.json's lm_gen_config, else the reference's.
SAMPLING_UNSET = {
    "greedy": "off, unless config.json's lm_gen_config sets use_sampling false; --no-greedy samples anyway",
    "temperature": "config.json's lm_gen_config.temp, else 0.8",
    "top_k": "lm_gen_config.top_k, else 250",
    "text_temperature": "lm_gen_config.temp_text, else 0.7",
    "text_top_k": "lm_gen_config.top_k_text, else 25",
    "seed": "none: fresh noise each run",
}

SERVE_HELP = {
    "host": "address to listen on",
    "port": "port to listen on",
    "api_key": "require 'Authorization: Bearer KEY' (repeat for several keys; $LOCKSTEP_API_KEYS adds keys "
               "that stay out of the process list)",
    "admission_wait": "seconds a new session may wait for a free slot before 503",
    "max_body_mb": "largest audio upload per request, in MB",
    "idle_timeout": "end a session that sends no audio for this many seconds",
    "shutdown_timeout": "on SIGTERM, seconds running sessions get to finish",
    "max_buffer_seconds": "input audio buffered ahead of real time beyond this is dropped (oldest first)",
    "static": "serve this folder at / instead of the built-in page (e.g. the built 'dist' folder of Kyutai's "
              "Moshi web UI, which talks to ws /api/chat)",
    "ssl_certfile": "serve HTTPS with this certificate (PEM; with --ssl-keyfile): browsers on other machines "
                    "give the page the microphone only over HTTPS",
    "ssl_keyfile": "the certificate's private key (PEM)",
    "no_warmup": "accept sessions at once, without first running every batch bucket (CUDA-graph capture, "
                 "kernel compilation) on the scratch slot, nor timing each size at full context (the "
                 "capacity probe); the first tick at each new size then pays for it",
    "api_workers": "API processes serving HTTP and websockets beside the engine process (0: one per 4 cores, "
                   "1 to 4)",
    "engine_threads": "CPU threads for the engine's tensor work (0: the machine's cores less the API processes, "
                      "at least 1): an engine thread that shares a core with an API process stalls every tick",
    "max_input_lag": "a real-time call's input lag (audio received, not yet stepped) is held under this many "
                     "seconds: when its lowest level over a second is above it, its oldest input is dropped "
                     "(counted); uploads (realtime false) are held only by --max-buffer-seconds",
    "metrics_port": "serve /metrics (and health) on this port, with no key, instead of on --port (where it is "
                    "behind --api-key when one is set); keep this port private",
    "head_timeout": "seconds a connection gets to send a whole request head before it is closed",
    "engine_timeout": "the engine loop not coming round for this many seconds is a hang: the server stops with "
                      "status 1 (/healthz fails after 5 s)",
    "admit_realtime": "admit at most as many sessions as the start-up capacity probe found to run in real time "
                      "(callers past them get 503 + Retry-After), rather than one per slot: every admitted "
                      "call then stays on time",
    "session_prefix": "start every session id with this (tells servers apart behind a balancer; --ray sets "
                      "each replica's id)",
    "opus_complexity": "libopus complexity (0..10) of ws /api/chat's audio out: 5 costs ~0.19 ms of API CPU per "
                       "session-frame, 7 and up ~1 ms (speech analysis, SILK+CELT, as sphn's writer); see "
                       "docs/serving.md",
    "opus_bitrate": "kbit/s of ws /api/chat's audio out (6..510; 0: libopus's choice, ~27 at 24 kHz): at 56 and "
                    "complexity 5 the audio scores as sphn's writer does (PESQ-WB 4.43 against 4.45) for a fifth "
                    "of its CPU",
}

CLUSTER_HELP = {
    "ray": "serve on a Ray cluster: one engine per replica (one per GPU), every replica behind Ray Serve's "
           "proxy on --host/--port (docs/cluster.md)",
    "address": "Ray cluster to join (e.g. auto, or ray://HEAD:10001); unset: join $RAY_ADDRESS or start one here",
    "replicas": "number of replicas (0: one per GPU in the cluster, or 1 when it has none); with "
                "--min-replicas/--max-replicas, the number to start with",
    "min_replicas": "autoscale between --min-replicas and --max-replicas on slot usage",
    "max_replicas": "upper bound for autoscaling",
    "target_slot_usage": "autoscaling aims at this fraction of the replicas' slots busy",
    "downscale_delay": "seconds slot usage must stay below the target before autoscaling removes a replica",
    "replica_cpus": "CPUs Ray reserves for each replica (its engine and API; the engine takes all but one for "
                    "its threads unless --engine-threads says)",
    "routing_stats_period": "seconds between each replica's load reports to the router",
}
