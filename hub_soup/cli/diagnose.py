"""``hub-soup diagnose A B``: why (not) a soup, the score along the straight line between two models.

The two models are opened and aligned as ``merge`` would open and align them
(the same ``--no-ema``, ``--exclude`` and ``--allow-pickle``), so the curve is
that of the soup a merge with the same flags would make.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hub_soup.cli.options import (
    ALLOW_PICKLE,
    BASE,
    DEVICE,
    EXCLUDE,
    NO_EMA,
    RECALIBRATE_BN,
    TOKEN,
    TRUST_REMOTE_CODE,
    add_eval_options,
    eval_spec_from_args,
)
from hub_soup.errors import EXIT_OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``diagnose`` command to ``commands``."""
    parser = commands.add_parser("diagnose", help="why (not) a soup: the score along the line between two models")
    parser.add_argument("refs", nargs=2, metavar="REF", help="the two ingredients (alpha 0 is the first)")
    BASE.add(parser, help="the model both were fine-tuned from: distances relative to it")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1], help="points on the line")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also save the curve as a PNG there")
    RECALIBRATE_BN.add(parser, help="also score each point with BatchNorm recalibrated")
    ALLOW_PICKLE.add(parser)
    NO_EMA.add(parser)
    EXCLUDE.add(parser, help="keys not interpolated: taken from the first REF (repeatable)")
    DEVICE.add(parser, help="where the models run")
    TOKEN.add(parser)
    TRUST_REMOTE_CODE.add(parser)
    add_eval_options(parser, required=True, test_split=False)  # the curve is scored on one split
    parser.set_defaults(handler=diagnose_command)


def diagnose_command(args: argparse.Namespace) -> int:
    """Score the line between the two refs (and measure distances from ``--base``) and print the report."""
    from hub_soup.eval.diagnose import diagnose
    from hub_soup.eval.evaluate import Evaluator
    from hub_soup.eval.spec import EvalSpec
    from hub_soup.hub.resolve import resolve_ref
    from hub_soup.ingredients import Models, layout_of, layouts_of, opened_ingredients
    from hub_soup.merging.plan import align
    from hub_soup.pipeline import check_eval, device_for
    from hub_soup.recipe import Recipe, validated
    from hub_soup.threads import eval_threads, torch_threads

    section = eval_spec_from_args(args)
    assert section is not None  # --eval-task and --eval-data are required here
    spec = validated(EvalSpec, section, "eval")
    device = device_for(args.device or Recipe.model_fields["device"].default)  # a GPU this machine lacks stops here
    check_eval(spec, Path(), args.token)  # and so do a GPU the placement names and this machine lacks, and missing data
    resolved = Models(args.refs, args.base).map(lambda ref: resolve_ref(ref, token=args.token))
    with opened_ingredients(resolved, allow_pickle=args.allow_pickle, ema=args.ema, token=args.token) as opened:
        checkpoints, base = opened.ingredients, opened.base
        plan = align(layouts_of(checkpoints), args.exclude, base=layout_of(base) if base is not None else None)
        # closed when the curve is scored: the model goes, and with a device map its offload folder
        with torch_threads(eval_threads()), Evaluator(
            spec, checkpoints[0], device=device, trust_remote_code=args.trust_remote_code
        ) as evaluator:
            report = diagnose(
                checkpoints[0], checkpoints[1], plan, evaluator, alphas=args.alphas,
                base=base, plot_path=args.plot,
                recalibrate_bn_batches=args.recalibrate_bn,
            )
    print(report.text())
    return EXIT_OK
