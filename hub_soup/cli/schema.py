"""``hub-soup schema``: the JSON Schema of recipe files, for editors and linters."""

from __future__ import annotations

import argparse
import json

from hub_soup.errors import EXIT_OK
from hub_soup.recipe import recipe_schema


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``schema`` command to ``commands``."""
    parser = commands.add_parser("schema", help="print the JSON Schema of recipe files")
    parser.set_defaults(handler=schema_command)


def schema_command(args: argparse.Namespace) -> int:
    """Print the schema: it comes from the recipe's own pydantic models, so it is never out of date."""
    print(json.dumps(recipe_schema(), indent=2))
    return EXIT_OK
