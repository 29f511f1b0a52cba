"""The one code path from a :class:`~hub_soup.recipe.Recipe` to a soup on disk (and on the Hub).

Stages run in order and data only flows down, one module each, driven by :func:`run`
(``flow.py``): preflight (``preflight.py``) -> resolve (``resolving.py``) -> choose the kind of
soup (:mod:`hub_soup.soups`) -> open, with the kind's checks from headers and configs before any
download (:mod:`hub_soup.ingredients`) -> prepare (align, side files) -> [score] (``scoring.py``)
-> pin (``pin.py``) -> write, with the card (``writing.py``) -> gate -> push (``gate.py``). Every
check that can fail on the user's input runs before the expensive stages: code the recipe names
(only with ``trust_remote_code``), the output folder (never an input), the push token, the
alignment and the configs (from headers over HTTP when possible), so a mistake costs seconds,
not a download. A soup that is pushed without an output folder is staged in a temporary one, so
the same command can run again and again.

What differs between a soup of full models and one of LoRA adapters (written as an adapter, or
merged into their base) is the kind's (:class:`~hub_soup.soups.kind.SoupKind`): what it resolves,
opens and checks early, how candidates are scored, what it writes and what its card says. The
stages never ask which kind it is.

Started by ``accelerate launch`` among K processes (see
:func:`~hub_soup.eval.backends.launched_backend`), every process runs the same
stages up to the evaluation: it checks, opens the ingredients, makes every
candidate soup and scores its share of the eval data, and the gathered outputs
give every process the same scores and choices. Only the main process (rank 0)
then writes the soup and its card and pushes; the others return without writing
and, meanwhile, log nothing but errors.
"""

from __future__ import annotations

from hub_soup.pipeline.flow import run
from hub_soup.pipeline.pin import pin_recipe
from hub_soup.pipeline.preflight import check_eval, check_eval_devices, cuda_device, device_for
from hub_soup.report import SoupResult

__all__ = ["SoupResult", "check_eval", "check_eval_devices", "cuda_device", "device_for", "pin_recipe", "run"]
