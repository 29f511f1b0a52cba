"""``python -m hub_soup``: the ``hub-soup`` command, as ``accelerate launch -m hub_soup merge ...`` runs it."""

from hub_soup.cli import console_main

console_main()
