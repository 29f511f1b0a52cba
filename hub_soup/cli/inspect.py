"""``hub-soup inspect REF...``: formats, dtypes and sizes; with several refs, alignment and similarity.

It opens headers only (pickles aside) and writes nothing: the look before a merge.
"""

from __future__ import annotations

import argparse
from collections import Counter

from hub_soup.cli.options import ALLOW_PICKLE, EXCLUDE, NO_EMA, REFS, TOKEN
from hub_soup.errors import EXIT_BAD_INPUT, EXIT_OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command to ``commands``."""
    parser = commands.add_parser("inspect", help="formats, dtypes and sizes; with several refs, alignment and similarity")
    REFS.add(parser)
    ALLOW_PICKLE.add(parser)
    NO_EMA.add(parser, help="inspect raw weights, not EMA ones")
    EXCLUDE.add(parser, help="keys left out of the alignment check and the similarity table (repeatable)")
    TOKEN.add(parser)
    parser.set_defaults(handler=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    """Describe each ref; exit with the bad-input code when they do not align, as ``merge`` would."""
    from hub_soup.errors import AlignmentError
    from hub_soup.hub.resolve import resolve_ref
    from hub_soup.ingredients import Models, layouts_of, opened_ingredients
    from hub_soup.io.sizes import describe_size
    from hub_soup.merging.plan import align
    from hub_soup.merging.similarity import SHARED_INIT_COSINE, weight_similarity

    resolved = [resolve_ref(r, token=args.token) for r in args.refs]
    with opened_ingredients(
        Models(resolved), allow_pickle=args.allow_pickle, ema=args.ema, token=args.token
    ) as opened:
        checkpoints = opened.ingredients
        for ref, ckpt in zip(resolved, checkpoints):
            dtypes = Counter(str(m.dtype).removeprefix("torch.") for m in ckpt.metas.values())
            size = sum(m.nbytes for m in ckpt.metas.values())
            print(f"{ref.pinned}")
            print(f"  format:     {ckpt.format}")
            print(f"  tensors:    {len(ckpt.metas)} ({', '.join(f'{n} {d}' for d, n in dtypes.most_common())})")
            print(f"  elements:   {ckpt.num_elements:,} ({describe_size(size)})")
            if ckpt.aliases:
                print(f"  tied:       {'; '.join(' = '.join(g) for g in ckpt.aliases)}")
            for note in ckpt.notes:
                print(f"  note:       {note}")
        if len(checkpoints) > 1:
            try:
                plan = align(layouts_of(checkpoints), args.exclude)
            except AlignmentError as exc:
                print(f"alignment: FAILS: {exc}")
                return EXIT_BAD_INPUT
            print(f"alignment: ok, {len(plan.tensors)} tensors ({len(plan.tensors) - len(plan.copied)} averaged, "
                  f"{len(plan.copied)} copied from the first)")
            for note in plan.notes:
                print(f"  note: {note}")
            similarity = weight_similarity(checkpoints, plan)
            print(similarity.table())
            pairs = similarity.independent_pairs()
            print(
                f"shared initialization: NO for pairs {pairs}: averaging them will likely collapse"
                if pairs
                else f"shared initialization: likely (all pairs have cosine >= {SHARED_INIT_COSINE})"
            )
    return EXIT_OK
