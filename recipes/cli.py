"""The ``rxt`` command line.

Usage::

    rxt --version
    rxt COMMAND [ARGS...]

Subcommands are registered in :func:`build_parser` (``subparsers.add_parser(...)`` with
``set_defaults(func=...)``; ``func(args)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

PACKAGE_NAME = "rxt-hf"


def package_version() -> str:
    """The version of ``rxt-hf`` (written once, in ``rxt_hf/__init__.py``)."""
    from rxt_hf import __version__

    return __version__


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand registry."""
    parser = argparse.ArgumentParser(
        prog="rxt",
        description="Reactive Transformer (RxT) for Hugging Face: train, evaluate and talk to RxT models.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PACKAGE_NAME} {package_version()}",
        help="print the package version and exit",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = subparsers.add_parser("train", help="run a recipe's curriculum (all stages, or some) and evaluate")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/default.yaml")
    train.add_argument("--output", default=None, help="output folder (default: the recipe's output_dir)")
    train.add_argument("--stages", default=None, help="comma-separated stage names to run, optional ones too (each needs its predecessor's folder)")
    train.add_argument("--from-stage", default=None, help="run this stage and every later one of the main job")
    train.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="change a recipe value before it is checked (repeatable; VALUE is YAML), e.g. "
        "--set stages.smat.config.max_steps=10 --set data.source=my-stories.jsonl",
    )
    train.set_defaults(func=command_train)

    evaluate = subparsers.add_parser("eval", help="answer perplexity and recall accuracy by distance vs a no-memory control")
    evaluate.add_argument("model", help="saved model folder (with its tokenizer)")
    evaluate.add_argument("--recipe", default=None, help="recipe whose data / evaluation settings to use (default: embedded data)")
    evaluate.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                          help="change a value of --recipe (repeatable), e.g. --set evaluation.data.source=dev.jsonl")
    evaluate.add_argument("--num-conversations", type=int, default=None)
    evaluate.add_argument("--num-turns", type=int, default=None)
    evaluate.add_argument("--max-new-tokens", type=int, default=None)
    evaluate.add_argument("--memory-from", choices=["generated", "reference"], default=None)
    evaluate.add_argument("--output", default=None, help="JSON file to write (default: MODEL/../evaluation.json)")
    evaluate.add_argument("--threads", type=int, default=None)
    evaluate.set_defaults(func=command_eval)

    chat = subparsers.add_parser("chat", help="streaming terminal chat with memory")
    chat.add_argument("model", help="saved model folder (with its tokenizer)")
    chat.add_argument("--system-prompt", default=None, help="initial memory from this prompt interaction")
    chat.add_argument("--memory", default=None, help="start from / keep saving the STM in this .safetensors file")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.set_defaults(func=command_chat)

    convert = subparsers.add_parser(
        "convert",
        help="convert a reference (rxlm) RxT checkpoint into a transformers folder (docs/conversion.md)",
        description=(
            "Convert a checkpoint of the reference RxT implementation (rxlm 0.3.x): SRC is a whole RxTAlpha / RxTBeta "
            "folder or a folder of decoder / encoder / memory-attention component folders; or give the three "
            "component folders with --decoder --encoder --memory-attention and only DEST."
        ),
    )
    convert.add_argument(
        "paths", nargs="+", metavar="SRC DEST", help="[SRC] DEST (SRC may be omitted with the three component flags)"
    )
    convert.add_argument("--decoder", default=None, help="reference decoder component folder")
    convert.add_argument("--encoder", default=None, help="reference encoder component folder")
    convert.add_argument("--memory-attention", default=None, help="reference memory-attention component folder")
    convert.add_argument(
        "--tokenizer", default=None, help="reference tokenizer.json or its folder (default: found in SRC)"
    )
    convert.add_argument(
        "--rope-layout",
        choices=["interleaved", "legacy"],
        default="interleaved",
        help="'interleaved': rxlm >= 0.3.40 (December 2025 on); 'legacy': older rxlm and RxNN checkpoints",
    )
    convert.add_argument(
        "--initial-stm",
        choices=["normal", "saved", "zeros"],
        default="normal",
        help="init_memory() of the converted model: N(0, 1) as the reference's STM reset (default), the STM stored in "
        "the checkpoint, or zeros",
    )
    convert.add_argument(
        "--token-ids", default=None, help='JSON overrides of special-token ids, e.g. \'{"bos_token_id": 2}\''
    )
    convert.add_argument("--source-name", default=None, help="how the model card names the source (e.g. its Hub id)")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    convert.set_defaults(func=command_convert)

    # `rxt serve` parses its own options (serving.server.build_parser, from ServeConfig) when it runs, so the
    # optional serve extra (fastapi, uvicorn) and torch are imported only then.
    serve = subparsers.add_parser(
        "serve",
        help="HTTP server: conversations with memory, OpenAI-compatible endpoint, chat page (rxt serve --help)",
        add_help=False,
        prefix_chars="\0",
    )
    serve.add_argument("arguments", nargs=argparse.REMAINDER)
    serve.set_defaults(func=command_serve)

    from rxt_hf.benchmarks.cli import add_bench_command

    add_bench_command(subparsers)
    return parser, subparsers


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def command_train(args) -> int:
    from rxt_hf.recipes.pipeline import run_recipe
    from rxt_hf.recipes.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # validates everything before any training
    set_threads(args.threads)
    stages = [name.strip() for name in args.stages.split(",")] if args.stages else None
    for name in (stages or []) + ([args.from_stage] if args.from_stage else []):
        recipe.stage(name)
    run_recipe(
        recipe,
        output_dir=args.output,
        stages=stages,
        from_stage=args.from_stage,
        resume=args.resume,
        evaluate=not args.no_eval,
    )
    return 0


def command_eval(args) -> int:
    from pathlib import Path

    from rxt_hf.recipes.pipeline import evaluate_model
    from rxt_hf.recipes.recipe import load_recipe

    set_threads(args.threads)
    data, settings, seed = {}, {}, 0
    if args.overrides and not args.recipe:
        raise SystemExit("rxt eval: --set changes values of a recipe; give the recipe with --recipe.")
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        data, settings, seed = recipe.evaluation_data(), recipe.evaluation, recipe.seed
    overrides = {
        "num_conversations": args.num_conversations,
        "num_turns": args.num_turns,
        "max_new_tokens": args.max_new_tokens,
        "memory_from": args.memory_from,
    }
    settings = {**settings, **{k: v for k, v in overrides.items() if v is not None}}
    folder = Path(args.model)
    if not (folder / "config.json").exists():
        raise SystemExit(f"rxt eval: {folder} holds no saved model (config.json missing).")
    evaluate_model(folder, data, settings, seed, Path(args.output) if args.output else None)
    return 0


def command_chat(args) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from rxt_hf.modeling_rxt import RxTChat, RxTForCausalLM

    model = RxTForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    chat = RxTChat(model, tokenizer, system_prompt=args.system_prompt, max_new_tokens=args.max_new_tokens, **sampling)
    if args.memory and Path(args.memory).exists():
        chat.load(args.memory)
    print("RxT chat: type a message, /reset to forget, /quit to leave.", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            chat.reset()
            print("(memory reset)")
            continue
        if not text:
            continue
        print("rxt> ", end="", flush=True)
        for piece in chat.stream(text):
            print(piece, end="", flush=True)
        print(" [memory updating...]" if chat.updating else "", flush=True)
        if args.memory:
            chat.save(args.memory)
    chat.wait()
    return 0


def command_convert(args) -> int:
    import json
    import logging

    from rxt_hf.recipes.convert import ReferenceConversionError, convert_reference_checkpoint

    components = (args.decoder, args.encoder, args.memory_attention)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not any(components)):
        raise SystemExit(
            "rxt convert: usage: rxt convert SRC DEST, or rxt convert --decoder D --encoder E --memory-attention M DEST"
        )
    src, dest = (args.paths[0], args.paths[1]) if len(args.paths) == 2 else (None, args.paths[0])
    try:
        token_ids = json.loads(args.token_ids) if args.token_ids else None
    except json.JSONDecodeError as error:
        raise SystemExit(f"rxt convert: --token-ids is not valid JSON ({error}).") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = convert_reference_checkpoint(
            src,
            dest,
            decoder=args.decoder,
            encoder=args.encoder,
            memory_attention=args.memory_attention,
            tokenizer=args.tokenizer,
            rope_layout=args.rope_layout,
            initial_stm=args.initial_stm,
            token_ids=token_ids,
            source_name=args.source_name,
            overwrite=args.overwrite,
        )
    except ReferenceConversionError as error:
        raise SystemExit(f"rxt convert: {error}") from None
    print(f"converted to {folder} (load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
    return 0


def command_serve(args) -> int:
    try:
        from rxt_hf.serving.server import main as serve_main
    except ModuleNotFoundError as error:
        if error.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise SystemExit(f"rxt serve needs the serve extra ({error.name} is missing): pip install -e '.[serve]'.") from None
    return serve_main(args.arguments)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rxt`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    known = sorted(subparsers.choices)
    if argv and not argv[0].startswith("-") and argv[0] not in subparsers.choices:
        available = ", ".join(known) if known else "none in this version"
        parser.error(f"unknown subcommand {argv[0]!r} (available subcommands: {available}). Run 'rxt --help'.")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
