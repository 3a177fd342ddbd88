"""The `fornax` command: `serve` (this package) and `bench` (fornax.perf, when present)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fornax.api.server.args import add_serve_arguments

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
fornax: an LLM inference server, a drop-in replacement for `vllm serve`.

  fornax serve [MODEL] [flags]   OpenAI-compatible HTTP server (vLLM's flag names)
  fornax serve-ray CONFIG.yaml    the same models on Ray Serve: replicas, autoscaling (fornax[ray])
  fornax bench ...               benchmarks (when fornax.perf is installed)

Run `fornax <command> --help` for every flag of a command."""


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    """The bench subcommand lives in fornax.perf; registered only when that module provides it."""
    try:
        module = importlib.import_module("fornax.perf.cli")
    except ImportError:
        return
    add = getattr(module, "add_bench_parser", None)
    if callable(add):
        add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fornax", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = subparsers.add_parser(
        "serve", help="serve a model over HTTP (OpenAI-compatible API)",
        description="Serve a model over HTTP with an OpenAI-compatible API. Flags use vLLM's "
        "names; with no MODEL the packaged default chat model is served.")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    _add_serve_ray(subparsers)
    _add_bench(subparsers)
    return parser


def _add_serve_ray(subparsers: argparse._SubParsersAction) -> None:
    ray = subparsers.add_parser(
        "serve-ray", help="serve the models of a config file on Ray Serve (fornax[ray])",
        description="Run the models of a `fornax serve --config` YAML file as a Ray Serve "
        "application: one deployment per model, each replica a `fornax serve` process, behind "
        "one OpenAI-compatible HTTP endpoint at the file's host and port. The file's "
        "`deployment:` section sets replicas, autoscaling, queue bounds and resources.")
    ray.add_argument("config", metavar="CONFIG.yaml", help="fornax serve's YAML plus deployment:")
    ray.add_argument("--address", default=None,
                     help="the Ray cluster to join (`auto`: the one `ray start` runs here); "
                     "default: start a local one for this command")
    ray.set_defaults(func=_serve_ray)


def _serve_ray(args: argparse.Namespace) -> int:
    from fornax.runtime.errors import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from fornax.ray_serve.app import serve_ray

        return serve_ray(args.config, args.address)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("ray", "fastapi", "starlette"):
            logger.error("fornax serve-ray needs Ray Serve: pip install 'fornax[ray]' (%s)", exc)
            return 2
        raise
    except ConfigError as exc:
        logger.error("fornax serve-ray: %s", exc)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from fornax.api.server.serve import run_serve

    return run_serve(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # vLLM's conventions: --config YAML, underscores, -O3, -cc.key
        from fornax.api.server.argv import ArgvError, HelpText, normalize_serve_argv, subparser

        try:
            argv = ["serve", *normalize_serve_argv(argv[1:], subparser(parser, "serve"))]
        except ArgvError as exc:
            parser.exit(2, f"fornax serve: error: {exc}\n")
        except HelpText as text:
            sys.stdout.write(str(text))
            return 0
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
