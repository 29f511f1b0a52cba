"""``python -m hub_soup.cli``: the ``hub-soup`` command."""

from hub_soup.cli import console_main

console_main()
