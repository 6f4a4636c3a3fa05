"""The `lockstep` command. Flags are derived from the typed configs (EngineConfig, SamplingConfig)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from engine import flag_help, host
from engine.checkpoint import CheckpointError
from engine.config import ClusterConfig, ConfigError, EngineConfig, SamplingConfig, ServeConfig, flag_name

BUILTIN_PRESET = "tiny-lm"


def _add_dataclass_flags(p: argparse.ArgumentParser, cls, helps: dict[str, str],
                         unset: dict[str, str] | None = None) -> None:
    """One flag per field of `cls`. With `unset` (what each unset flag means, for the help), flags
    default to None, so that what was given can be told from what was not."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        # The declared default ("auto"), not what construction resolves it to on this machine.
        default = f.default if f.default is not dataclasses.MISSING else getattr(defaults, f.name)
        if unset is not None:
            kind = None if isinstance(default, bool) else int if f.type in ("int", "int | None") else float
            p.add_argument(flag_name(f.name), dest=f.name, default=None, help=f"{helps[f.name]} (default: {unset[f.name]})",
                           **({"action": argparse.BooleanOptionalAction} if kind is None else {"type": kind}))
        elif isinstance(default, bool):
            p.add_argument(flag_name(f.name), dest=f.name, action="store_true", help=helps[f.name])
        elif isinstance(default, tuple):
            p.add_argument(flag_name(f.name), dest=f.name, action="append", default=None, help=helps[f.name])
        else:
            kind = int if f.type in ("int", "int | None") else float if f.type == "float" else str
            p.add_argument(flag_name(f.name), dest=f.name, type=kind, default=default,
                           help=f"{helps[f.name]} (default: {default})")


def _from_args(cls, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if isinstance(getattr(cls(), f.name), tuple):
            values[f.name] = tuple(values[f.name] or ())
    return cls(**values).validate()


def builtin_checkpoint() -> Path:
    """The random-weight checkpoint used when no weights are named, made once and cached."""
    from engine.make_checkpoint import make_checkpoint
    root = host.cache_root() / f"builtin-{BUILTIN_PRESET}"
    if not (root / "config.json").exists():
        print(f"lockstep: no --model-dir/--hf-repo given; making a random-weight checkpoint in {root}",
              file=sys.stderr)
        if root.exists():  # left half-written by a version that wrote in place
            shutil.rmtree(root)
        make_checkpoint(root, BUILTIN_PRESET)
    return root


def with_builtin_weights(cfg: EngineConfig) -> EngineConfig:
    """`cfg`, or where it names no weights, `cfg` naming the built-in checkpoint (made once)."""
    if cfg.model_dir is None and cfg.hf_repo is None:
        cfg = dataclasses.replace(cfg, model_dir=str(builtin_checkpoint()))
    return cfg


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return with_builtin_weights(_from_args(EngineConfig, args))


def cmd_make_checkpoint(args: argparse.Namespace) -> None:
    from engine.make_checkpoint import make_checkpoint
    out = make_checkpoint(args.dir, args.preset, args.seed, args.context, args.mimi_context, args.lora_rank, args.q8)
    print(f"wrote {args.preset} checkpoint to {out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.generate import generate, plan_outputs, prepare_output_dir
    from engine.runner import ModelRunner
    if not args.output_dir:  # an unset shell variable, most likely: not "here"
        raise ConfigError("--output-dir is empty; name a folder (. for this one)")
    cfg = engine_config(args)
    paths, output_dir = [Path(p) for p in args.inputs], Path(args.output_dir)
    prepare_output_dir(output_dir)  # before the load, which is what takes time
    names = plan_outputs(paths, output_dir)
    runner = ModelRunner.load(cfg)
    sampling = runner.default_sampling.overridden({f.name: getattr(args, f.name)
                                                   for f in dataclasses.fields(SamplingConfig)}, flag_name)
    results = generate(runner, paths, names, output_dir, sampling)
    failed = [r for r in results.values() if r.error]
    print(f"generated {len(results) - len(failed)} session(s) into {args.output_dir}"
          + (f"; {len(failed)} input(s) failed" if failed else ""))
    if failed:
        sys.exit(1)


def serve_config(args: argparse.Namespace, environ=os.environ) -> ServeConfig:
    """The serve flags, plus the API keys in $LOCKSTEP_API_KEYS (comma- or space-separated), which
    unlike --api-key do not show in the process list."""
    from_env = tuple(k for k in environ.get("LOCKSTEP_API_KEYS", "").replace(",", " ").split() if k)
    cfg = _from_args(ServeConfig, args)
    return dataclasses.replace(cfg, api_key=cfg.api_key + from_env).validate() if from_env else cfg


def cmd_serve(args: argparse.Namespace) -> None:
    cluster = _from_args(ClusterConfig, args)
    if cluster.ray:
        from api.cluster_launch import serve_on_ray
        serve_on_ray({f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)},
                     serve_config(args), cluster)
        return
    from api.server import serve
    # The engine process resolves and checks its flags (and makes the built-in checkpoint), so that
    # the supervisor never loads torch.
    serve({f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}, serve_config(args))


def cmd_client(args: argparse.Namespace) -> None:
    from api.client import ClientError, run_client, transcript_path
    params = {"greedy": True} if args.greedy else {}
    if args.seed is not None:
        params["seed"] = args.seed
    try:
        result = run_client(args.url, Path(args.input), Path(args.output), args.api_key, not args.no_pace, params)
    except ClientError as e:
        print(f"lockstep client: {e}", file=sys.stderr)
        sys.exit(1)
    print("".join(result.text).strip())
    print(f"saved {len(result.pcm)} frames to {args.output} (transcript: {transcript_path(Path(args.output))}),"
          f" end: {result.end_reason}")


def cmd_bench(args: argparse.Namespace) -> None:
    import importlib
    status = importlib.import_module(f"bench.{args.which}").main(args.rest)
    if status:  # a benchmark that checks something (kernels, soak) says it failed
        sys.exit(status)


def version_line() -> str:
    """lockstep's version and what it runs on, for bug reports."""
    import importlib.metadata
    import platform

    import torch

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return (f"lockstep {version('lockstep')} (torch {torch.__version__}, {cuda}; triton {version('triton')}; "
            f"Python {platform.python_version()})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockstep", description="Serve Kyutai's Moshi to many sessions at once.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the kyutai layout")
    from engine.make_checkpoint import PRESETS
    mk.add_argument("dir")
    mk.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--context", type=int, default=None, help="override the LM context (tokens)")
    mk.add_argument("--mimi-context", type=int, default=None, help="override the Mimi transformers' context")
    mk.add_argument("--lora-rank", type=int, default=None,
                    help="also write a random LoRA adapter of this rank on every linear layer of the LM, as a "
                         "moshi-finetune checkpoint holds one (lora.safetensors, named in config.json)")
    mk.add_argument("--q8", action="store_true",
                    help="store the LM's linear weights in int8 with row scales, as kyutai's -q8 repositories do "
                         "(model.q8.safetensors, quantize: true)")
    mk.set_defaults(func=cmd_make_checkpoint)

    gen = sub.add_parser("generate", help="run audio files as concurrent sessions, offline")
    _add_dataclass_flags(gen, EngineConfig, flag_help.ENGINE_HELP)
    _add_dataclass_flags(gen, SamplingConfig, flag_help.SAMPLING_HELP, flag_help.SAMPLING_UNSET)
    gen.add_argument("--output-dir", required=True,
                     help="folder for each input's <name>.wav (Moshi's audio) and <name>.json (text and tokens)")
    gen.add_argument("inputs", nargs="+", help="input audio files (wav), one session each")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the streaming HTTP / websocket API")
    _add_dataclass_flags(srv, EngineConfig, flag_help.ENGINE_HELP)
    _add_dataclass_flags(srv, ServeConfig, flag_help.SERVE_HELP)
    _add_dataclass_flags(srv.add_argument_group("cluster (Ray Serve)"), ClusterConfig, flag_help.CLUSTER_HELP)
    srv.set_defaults(func=cmd_serve)

    cl = sub.add_parser("client", help="stream an audio file to a server in real time")
    cl.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8998")
    cl.add_argument("input", help="input audio file")
    cl.add_argument("--output", required=True, help="where to write Moshi's audio (wav); transcript beside it")
    cl.add_argument("--api-key", default=None)
    cl.add_argument("--greedy", action="store_true")
    cl.add_argument("--seed", type=int, default=None)
    cl.add_argument("--no-pace", action="store_true", help="send as fast as possible instead of in real time")
    cl.set_defaults(func=cmd_client)

    bn = sub.add_parser("bench", help="benchmarks: tick (offline sweep), serve (HTTP callers), kernels, "
                                      "soak (churn for many ticks: no leaks, no drift), cpu_kernels (the CPU path's C kernels), "
                                      "abuse (hostile clients beside real-time calls), host (the API side's cost per "
                                      "session, the model stubbed), "
                                      "fidelity (a dtype's logits beside the reference's, teacher-forced), "
                                      "capacity (callers per device under each KV policy and dtype, no model), "
                                      "kv_agreement (what fp8 KV costs in tokens)")
    bn.add_argument("which", choices=["tick", "serve", "kernels", "soak", "cpu_kernels", "abuse", "host", "fidelity",
                                      "capacity", "kv_agreement"])
    bn.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (see --help of each)")
    bn.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"lockstep: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a folder that cannot be made, a file that cannot be written: the path says it
        print(f"lockstep: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # generate has written what had ended by then
        print("lockstep: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
