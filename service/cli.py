"""The `cllm4rec` command: offline subcommands from model.cli, online ones from here."""

from __future__ import annotations

import argparse
import logging
import sys

from model import cli as model_cli
from model.backbone import BackboneError
from model.checkpoint import CheckpointError
from model.data import DataError
from model.train import ConfigError

USER_ERRORS = (DataError, CheckpointError, BackboneError, ConfigError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllm4rec", description="CLLM4Rec: LLM recommendations, trained offline "
                                     "and served online")
    subparsers = parser.add_subparsers(dest="command", required=True)
    model_cli.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        return model_cli.report_error(e)


if __name__ == "__main__":
    sys.exit(main())
