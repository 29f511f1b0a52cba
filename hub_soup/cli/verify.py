"""``hub-soup verify REF``: is a published merge what its recipe makes? (see :mod:`hub_soup.verification`)."""

from __future__ import annotations

import argparse
import json

from hub_soup.cli.options import ALLOW_PICKLE, TOKEN, TRUST_REMOTE_CODE, add_eval_options, eval_spec_from_args

EXAMPLES = """exit codes: 0 reproduced (bit for bit, or within --tolerance-ulp), 4 differs, 2 cannot verify

examples:
  # a merge on the Hub, at the commit its card was written for
  %(prog)s org/merged-model@3f1c2a9
  # a folder mergekit or hub-soup wrote, checked as CI does
  %(prog)s ./merged --json
  # and does it beat its ingredients? scored beside each of them (and the base) on your data
  %(prog)s org/merged --eval-task text-classification --eval-data org/my-eval --eval-split validation
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``verify`` command to ``commands``."""
    parser = commands.add_parser(
        "verify", help="check that a published merge is what its recipe makes",
        description="Rebuild a published merge from the recipe it carries (hub-soup.yaml, mergekit_config.yml or "
        "the mergekit config in its card), streamed and never written, and compare it tensor by tensor.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ref", metavar="REF", help="the merge: a Hub repo org/name[@revision], or a local folder")
    parser.add_argument(
        "--tolerance-ulp", type=int, default=2, metavar="N",
        help="floating elements that differ by at most N units in the last place count as reproduced: of their own "
        "value, or where the merge's terms cancel, of their inputs' largest magnitude (default 2)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for CI)")
    parser.add_argument(
        "--create-pr", action="store_true",
        help="open a pull request on the merge's repo adding the verdict, and the scores of --eval-task, to its card",
    )
    TOKEN.add(parser)
    TRUST_REMOTE_CODE.add(parser)
    ALLOW_PICKLE.add(parser)
    add_eval_options(parser)
    parser.set_defaults(handler=verify_command)


def verify_command(args: argparse.Namespace) -> int:
    """Verify, print the report (text or JSON; in GitHub Actions the step summary too) and exit with the
    verdict's code."""
    from hub_soup.summary import write_step_summary
    from hub_soup.verification import verify

    report = verify(args.ref, tolerance_ulp=args.tolerance_ulp, eval=eval_spec_from_args(args),
                    create_pr=args.create_pr, token=args.token, trust_remote_code=args.trust_remote_code,
                    allow_pickle=args.allow_pickle)
    write_step_summary(report.markdown())
    print(json.dumps(report.to_json(), indent=2) if args.json else report.text())
    return report.exit_code
