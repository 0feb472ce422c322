"""The `pwemoe` command line.

Each subcommand is one entry of `COMMANDS`: its help line, a function that adds its arguments, and a handler that
runs it and returns the exit status. Lists a user chooses from (devices, precisions) come from their registries.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One subcommand: `arguments(parser)` adds its arguments, `run(args)` runs it and returns the exit status."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: Callable[[], str] | None = None  # built with the parser, from the registries it names


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


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command in COMMANDS (their help texts built now, from the registries)."""
    ap = argparse.ArgumentParser(
        prog="pwemoe",
        description="Pareto set learning through model merging (PWEMoE): learn every trade-off between fine-tuned "
        "experts, then evaluate, select, serve and export any of them.",
    )
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, c in COMMANDS.items():
        c.arguments(sub.add_parser(name, help=c.help, epilog=c.epilog() if c.epilog else None))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .config import ConfigError

    try:
        return COMMANDS[args.cmd].run(args)
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


# --- arguments several commands share -------------------------------------------------------------------------
def _device_arg(p: argparse.ArgumentParser, default: str = "the config's") -> None:
    from .devices import DEVICE_CHOICES

    p.add_argument("--device", help=f"{DEVICE_CHOICES} (default: {default})")


def _placement(p: argparse.ArgumentParser) -> None:
    from .devices import PRECISIONS

    _device_arg(p)
    p.add_argument("--precision", choices=list(PRECISIONS), help="autocast precision (default: the config's)")


def _merged_decoding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-merged-decoding",
        action="store_true",
        help="causal-LM runs: decode a batch whose sequences share one preference on the upcycled model too, not "
        "on a merged copy (slower; saves the copy's memory, one backbone)",
    )


def _preference_arg(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from .core.preference import parse_preference

    return parse_preference(text)


# --- train ------------------------------------------------------------------------------------------------------
def _train_epilog() -> str:
    from .config import resumable_keys

    return f"Settings: `pwemoe config --explain`. On --resume only these may change: {resumable_keys()}."


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (with --resume: omit it; key=value overrides only)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier pwemoe run in run_dir (other files are kept)",
    )


def _train(args: argparse.Namespace) -> int:
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


# --- evaluate ---------------------------------------------------------------------------------------------------
def _evaluate_args(p: argparse.ArgumentParser) -> None:
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


def _evaluate(args: argparse.Namespace) -> int:
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


# --- select -----------------------------------------------------------------------------------------------------
def _select_epilog() -> str:
    from .selection import QUERY_FORMS

    return (
        f"Constraints: {QUERY_FORMS}. Exit status 0: certified; 1: not certified or infeasible (nothing exported); "
        "2: an error."
    )


def _select_args(p: argparse.ArgumentParser) -> None:
    from .selection import Settings

    d = Settings()
    p.add_argument("run")
    p.add_argument("--maximize", metavar="TASK", help="the task whose metric to maximise, or mean (share of experts)")
    p.add_argument("--minimize", metavar="TASK", help="a lower-is-better task (a causal LM's loss) to minimise")
    p.add_argument("--require", action="append", default=[], metavar="C", help='e.g. "rt >= 0.95 expert" (repeat)')
    p.add_argument("--confidence", type=float, default=d.confidence, help="of every one-sided bound")
    p.add_argument("--budget", type=int, default=d.budget, help="preferences evaluated at most")
    p.add_argument("--grid", type=int, help="levels of the starting simplex grid (default: from the budget)")
    p.add_argument("--seed", type=int, default=d.seed, help="of the search/certification split and the bootstrap")
    p.add_argument(
        "--certify-fraction", type=float, default=d.certify_fraction, help="share of validation data held out"
    )
    p.add_argument("--name", help="the record's name: RUN/selections/NAME.json (default: from the query)")
    p.add_argument("--export", metavar="OUT", help="export a certified choice to this directory")
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier export wrote in --export")
    p.add_argument("--no-test", action="store_true", help="do not report the chosen point's test-split values")
    p.add_argument("--batch-size", type=int)
    _placement(p)


def _select(args: argparse.Namespace) -> int:
    from .selection import Settings, select_run

    s = Settings(args.confidence, args.budget, args.grid, args.seed, args.certify_fraction)
    record = select_run(
        args.run,
        args.maximize,
        args.minimize,
        args.require,
        s,
        name=args.name,
        export=args.export,
        overwrite=args.overwrite,
        report_test=not args.no_test,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
    )
    return 0 if record["status"] == "certified" else 1


# --- export -----------------------------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("--preference", required=True, help="e.g. 0.2,0.8")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace what an earlier export wrote in --out")
    p.add_argument(
        "--adapter-rank",
        type=int,
        help="LoRA-expert runs: one rank R for every layer of the exported adapter (within an engine's "
        "largest LoRA rank, e.g. vLLM's max_lora_rank)",
    )
    _device_arg(p, "the run's config")
    p.add_argument(
        "--engine",
        choices=["torch", "mergekit"],
        default="torch",
        help="torch: rebuild the run and merge in memory; mergekit: out-of-core merge of dense causal-LM runs "
        "(writes mergekit.yaml; extra 'mergekit')",
    )
    p.add_argument("--plan-only", action="store_true", help="--engine mergekit: write only OUT/mergekit.yaml")


def _export(args: argparse.Namespace) -> int:
    if args.engine == "mergekit":
        from .mergekit_export import export_mergekit

        if args.adapter_rank is not None:
            raise ValueError("--adapter-rank writes a LoRA adapter with the torch engine; drop --engine mergekit")
        export_mergekit(args.run, args.preference, args.out, overwrite=args.overwrite, plan_only=args.plan_only)
        return 0
    if args.plan_only:
        raise ValueError("--plan-only writes a mergekit plan: add --engine mergekit")
    from .runs import export_run

    export_run(
        args.run,
        args.preference,
        args.out,
        overwrite=args.overwrite,
        device=args.device,
        adapter_rank=args.adapter_rank,
    )
    return 0


# --- serve ------------------------------------------------------------------------------------------------------
def _serve_epilog() -> str:
    return (
        "API: GET /api/run, GET /api/results, POST /api/routing_weights, /api/predict, /api/evaluate, /api/export, "
        "/api/select; causal-LM runs also /v1/chat/completions, /v1/completions, /v1/models (OpenAI). curl "
        "examples: docs/guides/serving.md."
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="most inputs one /api/predict request may carry; causal-LM runs: most sequences decoded together",
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=16384,
        help="causal-LM runs: most tokens (prompt + max_tokens of every sequence) in the decoding batch at once",
    )
    p.add_argument("--preference", help="causal-LM runs: the preference of requests that give none (default: 1/k each)")
    _merged_decoding_arg(p)
    p.add_argument(
        "--served-model-name", help="causal-LM runs: the model name of the /v1 API (default: the run's name)"
    )
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument(
        "--eval-queue",
        type=int,
        default=8,
        help="asynchronous evaluations that may wait behind the running one (more are answered 429)",
    )
    p.add_argument("--max-test-samples", type=int, help="'evaluate now' uses the first N test examples per task")
    _placement(p)


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(
        args.run,
        host=args.host,
        port=args.port,
        public=args.public,
        max_body_mb=args.max_body_mb,
        model_name=args.served_model_name,
        eval_queue=args.eval_queue,
        cache_size=args.cache_size,
        max_batch=args.max_batch,
        token_budget=args.token_budget,
        default_preference=_preference_arg(args.preference),
        merged_decoding=not args.no_merged_decoding,
        max_test_samples=args.max_test_samples,
        device=args.device,
        precision=args.precision,
    )
    return 0


# --- generate ---------------------------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--preference", help="e.g. 0.7,0.3 (default: 1/k each)")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a string that ends the text (repeatable)")
    _merged_decoding_arg(p)
    _placement(p)


def _generate(args: argparse.Namespace) -> int:
    from .serve.model import PreferenceModel

    pm = PreferenceModel(
        args.run,
        device=args.device,
        precision=args.precision,
        max_test_samples=1,
        merged_decoding=not args.no_merged_decoding,
    )
    inputs: list[Any] = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompts]
    outs = pm.generate(
        inputs,
        _preference_arg(args.preference),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
    )
    for prompt, out in zip(args.prompts, outs):
        if len(outs) > 1:
            print(f"--- {prompt}")
        print(out["text"])
    pm.scheduler().close()
    return 0


# --- finetune ---------------------------------------------------------------------------------------------------
def _finetune_args(p: argparse.ArgumentParser) -> None:
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


def _finetune(args: argparse.Namespace) -> int:
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


# --- config -----------------------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--explain", action="store_true", help="(the default) print every key")


def _config(args: argparse.Namespace) -> int:
    from .config import explain
    from .configfile import registries

    print("\n".join(explain(registries=registries())))
    return 0


# --- demo -------------------------------------------------------------------------------------------------------
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="only the seconds-long built-in example on tiny random models")
    p.add_argument(
        "--llm", action="store_true", help="the LLM demo: LoRA experts on SmolLM2-135M-Instruct (GGUF, offline)"
    )
    p.add_argument("--workdir", help="default: demo_runs (demo_runs_llm with --llm)")
    p.add_argument(
        "--merges", action="store_true", help="also TIES and preference-weighted TIES (mergekit; about 4 more minutes)"
    )


def _demo(args: argparse.Namespace) -> int:
    if args.tiny:
        from .demo.tiny import run

        run()
    elif args.llm:
        from .demo.llm import run_llm_demo

        run_llm_demo(args.workdir or "demo_runs_llm", verbose=args.verbose)
    else:
        from .demo.offline import run_demo

        run_demo(args.workdir or "demo_runs", verbose=args.verbose, merges=args.merges)
    return 0


# In the order `pwemoe --help` lists them.
COMMANDS: dict[str, Command] = {
    "train": Command("upcycle the experts and train the routers", _train_args, _train, _train_epilog),
    "evaluate": Command(
        "evaluate a run on a preference grid, with baselines, plots and a report", _evaluate_args, _evaluate
    ),
    "select": Command(
        "choose a preference by constraints, certified on validation data the search did not see",
        _select_args,
        _select,
        _select_epilog,
    ),
    "export": Command("write a plain Hugging Face model for one preference", _export_args, _export),
    "serve": Command(
        "the Pareto explorer in the browser and a JSON inference API taking a preference per request",
        _serve_args,
        _serve,
        _serve_epilog,
    ),
    "generate": Command(
        "generate text at a preference (causal-LM runs)",
        _generate_args,
        _generate,
        lambda: "Several prompts are decoded together; temperature 0 (the default) is greedy.",
    ),
    "finetune": Command("fine-tune a base model on one task to make an expert", _finetune_args, _finetune),
    "config": Command("list every config key with its type, default and meaning", _config_args, _config),
    "demo": Command("the offline end-to-end example", _demo_args, _demo),
}


if __name__ == "__main__":
    sys.exit(main())
