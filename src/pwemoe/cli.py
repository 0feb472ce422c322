"""`pwemoe finetune | train | evaluate | export | serve | demo | config`."""

from __future__ import annotations

import argparse
import logging
import sys


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # quiet: pwemoe's own progress bars and results only
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except ImportError:  # datasets is an extra
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pwemoe", description=__doc__)
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    from .config import resumable_keys

    p = sub.add_parser(
        "train",
        help="upcycle the experts and train the routers",
        epilog=f"Settings: `pwemoe config --explain`. On --resume only these may change: {resumable_keys()}.",
    )
    p.add_argument("config", nargs="?", help="YAML config (with --resume: omit it; key=value overrides only)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier pwemoe run in run_dir (other files are kept)",
    )

    p = sub.add_parser("evaluate", help="evaluate a run on a preference grid, with baselines, plots and a report")
    p.add_argument("run")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grid", type=int, metavar="M", help="simplex grid with M levels per axis")
    g.add_argument("--preferences", metavar="FILE", help="file with one preference per line (comma separated)")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-test-samples", type=int, help="evaluate on the first N test examples per task")
    p.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="test (reported) or validation (for choosing settings; written under RUN/validation/)",
    )
    _placement(p)

    p = sub.add_parser("export", help="write a plain Hugging Face model for one preference")
    p.add_argument("run")
    p.add_argument("--preference", required=True, help="e.g. 0.2,0.8")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier export wrote in --out")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's config)")

    p = sub.add_parser(
        "serve",
        help="the Pareto explorer in the browser and a JSON inference API taking a preference per request",
        epilog="API: GET /api/run, GET /api/results, POST /api/routing_weights, /api/predict, /api/evaluate, "
        "/api/export (see the README for curl examples).",
    )
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--public", action="store_true", help="allow --host other than loopback (no authentication!)")
    p.add_argument(
        "--cache-size",
        type=int,
        default=4,
        help="merged models kept (LRU), one backbone's memory each; the most that exist at once "
        "(a request for another preference waits while all are in use)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="most inputs one /api/predict request may carry")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument(
        "--eval-queue",
        type=int,
        default=8,
        help="asynchronous evaluations that may wait behind the running one (more are answered 429)",
    )
    p.add_argument("--max-test-samples", type=int, help="'evaluate now' uses the first N test examples per task")
    _placement(p)

    p = sub.add_parser("finetune", help="fine-tune a base model on one task to make an expert")
    p.add_argument("config", help="YAML config with model.base and the task")
    p.add_argument("--task", required=True, help="name of the task in the config")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier finetune wrote in --out")
    p.add_argument("--lora-r", type=int, default=8, help="causal-LM tasks: LoRA rank of the adapter")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="causal-LM tasks: LoRA alpha (scaling alpha / r)")
    p.add_argument(
        "--lora-targets", default="q_proj,v_proj", help="causal-LM tasks: comma-separated module names to adapt"
    )
    _placement(p)

    p = sub.add_parser("config", help="list every config key with its type, default and meaning")
    p.add_argument("--explain", action="store_true", help="(the default) print every key")

    p = sub.add_parser("demo", help="the offline end-to-end example")
    p.add_argument("--tiny", action="store_true", help="only the seconds-long built-in example on tiny random models")
    p.add_argument(
        "--llm", action="store_true", help="the LLM demo: LoRA experts on SmolLM2-135M-Instruct (GGUF, offline)"
    )
    p.add_argument("--workdir", help="default: demo_runs (demo_runs_llm with --llm)")

    args = ap.parse_args(argv)
    _setup_logging(args.verbose)
    from .config import ConfigError

    try:
        return _dispatch(args)
    except ConfigError as e:
        if args.verbose:
            raise
        print(f"pwemoe: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pwemoe {args.cmd}: interrupted; the last checkpoint and results are kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line (with -v: the traceback)
        if args.verbose:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (ValueError, FileNotFoundError, TypeError, RuntimeError)):
            msg = f"{type(e).__name__}: {msg}"
        print(f"pwemoe {args.cmd}: error: {msg} (run with -v for the traceback)", file=sys.stderr)
        return 2


def _placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's)")
    from .devices import PRECISIONS

    p.add_argument("--precision", choices=list(PRECISIONS), help="autocast precision (default: the config's)")


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "demo":
        if args.tiny:
            from .demo.tiny import run

            run()
            return 0
        if args.llm:
            from .demo.llm import run_llm_demo

            run_llm_demo(args.workdir or "demo_runs_llm", verbose=args.verbose)
            return 0
        from .demo.offline import run_demo

        run_demo(args.workdir or "demo_runs", verbose=args.verbose)
        return 0
    if args.cmd == "config":
        from .config import explain
        from .configfile import registries

        print("\n".join(explain(registries=registries())))
        return 0
    if args.cmd == "train":
        from .recipes.train import train

        if not args.config and not args.resume:
            raise ValueError("give a config (pwemoe train CONFIG.yaml) or --resume RUN")
        config, overrides = args.config, list(args.overrides)
        if args.resume:  # `train --resume RUN train.steps=8`: the positionals are all overrides
            if config is not None and "=" not in config:
                raise ValueError(
                    f"with --resume the run's own config.yaml is used; got a config file {config!r} "
                    "too. Give only key=value overrides"
                )
            overrides = ([config] if config else []) + overrides
            config = None
        train(config, overrides, resume=args.resume, overwrite=args.overwrite, verbose=args.verbose)
        return 0
    if args.cmd == "evaluate":
        from .recipes.evaluate import evaluate_run

        evaluate_run(
            args.run,
            grid=args.grid,
            preferences_file=args.preferences,
            baselines=not args.no_baselines,
            batch_size=args.batch_size,
            max_test_samples=args.max_test_samples,
            verbose=args.verbose,
            device=args.device,
            precision=args.precision,
            split=args.split,
        )
        return 0
    if args.cmd == "export":
        from .runs import export_run

        export_run(args.run, args.preference, args.out, overwrite=args.overwrite, device=args.device)
        return 0
    if args.cmd == "serve":
        from .serve import serve

        serve(
            args.run,
            host=args.host,
            port=args.port,
            public=args.public,
            max_body_mb=args.max_body_mb,
            eval_queue=args.eval_queue,
            cache_size=args.cache_size,
            max_batch=args.max_batch,
            max_test_samples=args.max_test_samples,
            device=args.device,
            precision=args.precision,
        )
        return 0
    if args.cmd == "finetune":
        from .recipes.finetune import finetune_from_config

        finetune_from_config(
            args.config,
            args.task,
            args.out,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            overwrite=args.overwrite,
            device=args.device,
            precision=args.precision,
            lora={"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets.split(",")},
        )
        return 0
    raise AssertionError(args.cmd)  # argparse restricts cmd


if __name__ == "__main__":
    sys.exit(main())
