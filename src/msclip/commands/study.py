"""``msclip study --config STUDY.yaml [key=value ...]`` (or ``--preset fmnist|smoke``): the sharing-spectrum
study. Every model x seed is an ordinary `msclip train` run folder; a rerun skips finished runs and resumes
interrupted ones. ``--print-commands`` prints one shell line per run for any scheduler; ``--collect``
builds the report from the run folders wherever they ran. See docs/study.md."""
from __future__ import annotations

import argparse
import logging

NAME = "study"
HELP = "train and evaluate a list of model configs with one recipe and seeds; report (see docs/study.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", default=None, metavar="STUDY.yaml", help="study file (see docs/study.md)")
    src.add_argument("--preset", default=None, metavar="NAME",
                     help="a packaged study: fmnist (the tiny spectrum on Fashion-MNIST, 3 seeds) or smoke")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="write the study folder's study.yaml / recipe.yaml and print one train + evaluate "
                           "command line per run, for a scheduler; then --collect")
    mode.add_argument("--collect", action="store_true",
                      help="evaluate trained runs that are not evaluated yet and write the report; train nothing")
    mode.add_argument("--evaluate", default=None, metavar="RUN",
                      help="evaluate one trained run (a folder name below <study>/runs) and write its study-eval.json")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, as subprocesses (each with its share of the CPU threads, or one GPU)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="study fields, e.g. seeds=[0] eval.test_samples=500 recipe.train.steps=100")


def run(args: argparse.Namespace) -> int:
    from msclip.study import runner
    from msclip.study.spec import StudyError, load_study

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.jobs < 1:
        raise StudyError("--jobs must be >= 1")
    if args.config is None and args.preset is None:
        raise StudyError("give --config STUDY.yaml or --preset NAME (fmnist, smoke)")
    spec = load_study(args.config, args.overrides, preset=args.preset)  # validated before any folder is made
    if args.print_commands:
        for line in runner.print_commands(spec):
            print(line)
        return 0
    if args.evaluate:
        result = runner.evaluate_named(spec, args.evaluate)
        print(f"{args.evaluate}: {runner.headline(result)}")
        return 0
    data = runner.collect(spec) if args.collect else runner.run_study(spec, jobs=args.jobs)
    print(f"report: {spec.out_dir / 'report.md'} ({len(data['runs'])} runs"
          + (f", {len(data['missing'])} missing: {', '.join(m['name'] for m in data['missing'])}"
             if data["missing"] else "") + ")")
    return 1 if data["missing"] else 0
