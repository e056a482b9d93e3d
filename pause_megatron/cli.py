"""`pause-megatron`: the project's command line.

    pause-megatron recipe run RECIPE.yaml [--dry-run] [key=value ...]   run (or plan) a recipe's stages
    pause-megatron recipe report RECIPE.yaml [key=value ...]            rebuild its report from MLflow alone
    pause-megatron pretrain|finetune|evaluate ...                       the stage commands themselves
    pause-megatron export-hf CHECKPOINT OUT_DIR                         a checkpoint as a transformers model
    pause-megatron import-hf HF_DIR OUT_CHECKPOINT                      a transformers GPT-NeoX as a checkpoint
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def recipe_main(argv: list[str]) -> int:
    from pause_megatron.config import ConfigError
    from pause_megatron.recipe import load_recipe, missing_inputs, print_plan, run
    from pause_megatron.report import ReportError, build_report

    ap = argparse.ArgumentParser(prog="pause-megatron recipe")
    ap.add_argument("action", choices=["run", "report"])
    ap.add_argument("recipe")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (stages, GPUs, estimated time) only")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)  # overrides may come after --dry-run
    try:  # the whole plan resolves (every stage's config, task and variant) before anything runs
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            print_plan(recipe)
            return 0
        from pause_megatron.recipe import plan

        plan(recipe)
        if args.action == "run" and missing_inputs(recipe):  # a --dry-run plans without them
            raise ConfigError("; ".join(missing_inputs(recipe)) + "; nothing was run")
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "report":
        try:
            build_report(recipe)
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    return run(recipe, recipe_path=args.recipe, overrides=args.overrides)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "recipe":
        return recipe_main(rest)
    if command in ("pretrain", "finetune", "evaluate"):
        import importlib

        return importlib.import_module(f"pause_megatron.{command}").main(rest)
    if command in ("export-hf", "import-hf"):
        from pause_megatron import hf

        return (hf.export_main if command == "export-hf" else hf.import_main)(rest)
    print(f"error: unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
