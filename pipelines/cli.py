"""``damagenet``: one entry point, one subcommand per pipeline stage (each runs that stage's Prefect flow).

DVC calls these (see dvc.yaml); every knob comes from params.yaml.
"""

from __future__ import annotations

import argparse
import sys

import pipelines  # noqa: F401  (environment defaults before Prefect is imported)
from pipelines.params import load_params, section


def _demo_data(args, params):
    from pipelines.flows.demo_data import demo_data_flow

    demo_data_flow(**section(params, "demo_world", args.params))


def _zoo(args, params):
    from pipelines.flows.zoo import zoo_flow

    zoo_flow(section(params, "zoo", args.params), strict=args.strict)


STAGES = {
    "demo-data": (_demo_data, "Write the procedural demo world (class folders of JPEGs) from params 'demo_world'."),
    "zoo": (_zoo, "Train the zoo models on the demo world (params 'zoo'), save safetensors weights and val accuracy "
                  "to metrics/zoo.json."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="damagenet",
        description="DAmageNet pipeline: generate Attack-on-Attention shards and test models against them. "
        "Each subcommand is one DVC stage; `dvc repro` runs them in order.",
    )
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--strict", action="store_true", help="fail at the first bad source image instead of skipping it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = load_params(args.params)
    STAGES[args.stage][0](args, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
