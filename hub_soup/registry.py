"""One registry type for what hub-soup looks up by name: merge methods, eval tasks, metrics, checkpoint formats.

A registry maps names to objects. An entry may be a *reference* (``"module:attribute"``)
instead of the object: its name is known at once, and its module is imported on the
first :meth:`Registry.get`. The built-in eval tasks are references (their modules import
torch), and so is everything an installed package declares under the registry's
entry-point group, read from the distributions' metadata without importing them::

    [project.entry-points."hub_soup.methods"]
    median = "hub_soup_median_plugin.median:Median"

so ``hub-soup schema``, ``validate`` and ``--help`` list a plugin's names and stay light,
and a plugin's code runs only when a recipe uses it (a format's when a checkpoint is opened:
every format sniffs every file). Groups: ``hub_soup.methods``
(:class:`~hub_soup.merging.methods.MergeMethod` subclasses), ``hub_soup.tasks``
(:class:`~hub_soup.eval.tasks.EvalTask` subclasses), ``hub_soup.formats``
(:class:`~hub_soup.io.formats.CheckpointFormat` subclasses).

Torch-free, like the recipe that validates against it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from hub_soup.errors import HubSoupError

logger = logging.getLogger(__name__)

METHODS_GROUP = "hub_soup.methods"
TASKS_GROUP = "hub_soup.tasks"
FORMATS_GROUP = "hub_soup.formats"

T = TypeVar("T")


@dataclass(frozen=True)
class Reference:
    """An entry not imported yet: ``target`` is ``module:attribute``; ``origin`` names the distribution that
    declared it, None for hub-soup's own (whose import errors are hub-soup's, and propagate as they are)."""

    target: str
    origin: str | None = None


def _target(entry: object) -> str | None:
    """Where ``entry`` lives, as a :class:`Reference` spells it: a reference's target, a class's
    ``module:qualname``; None for anything else (a metric is known by its value)."""
    if isinstance(entry, Reference):
        return entry.target
    qualname = getattr(entry, "__qualname__", None)
    return f"{entry.__module__}:{qualname}" if isinstance(entry, type) and qualname else None


def _same(known: object, entry: object) -> bool:
    """Whether two entries are one: equal, or a reference and the class it points to (a module that
    registers its own classes with a decorator, imported after its entry point was read, adds nothing)."""
    return known == entry or (_target(known) is not None and _target(known) == _target(entry))


class Registry(Generic[T]):
    """Names -> objects of one kind, with entry points from installed distributions, loaded on first use.

    Args:
        kind: what the objects are, for messages (``merge method``).
        error: what a name nobody registered raises (it carries the exit code: bad input).
        group: the entry-point group installed packages add entries with; None: none.
        expected: the class a loaded entry must be a subclass of, its ``name`` attribute its entry's name.
        unknown: the message for a name nobody registered, formatted with ``kind``, ``name`` and ``names``
            (the registered names, comma separated); the hint always lists them.
        taken: the message for a name registered already for something else, formatted with ``kind``,
            ``name`` and ``known`` (what has it).
        taken_error: what that raises (default: ``error``); registering one thing twice is a programming
            error for some kinds (methods: ``ValueError``) and a plugin's bad input for others.
        how_to_add: the end of the hint: how a user adds an entry of their own.
        references: built-in entries as ``name: "module:attribute"``, imported on first use.
    """

    def __init__(
        self, kind: str, *, error: type[HubSoupError], group: str | None = None, expected: type | None = None,
        unknown: str = "unknown {kind} {name!r}", taken: str = "{kind} {name!r} is already registered ({known})",
        taken_error: Callable[[str], Exception] | None = None, how_to_add: str = "",
        references: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._error = error
        self._expected = expected
        self._unknown = unknown
        self._taken = taken
        self._taken_error = taken_error
        self._how_to_add = how_to_add
        self._entries: dict[str, T | Reference] = {
            name: Reference(target) for name, target in (references or {}).items()
        }
        self._discovered = group is None

    def copy(self) -> Registry[T]:
        """A registry with the same entries, for a test that registers things and drops them afterwards; it
        reads the entry points again on first use (a test may have put a distribution on ``sys.path``)."""
        copied: Registry[T] = Registry.__new__(Registry)
        copied.__dict__.update(self.__dict__, _entries=dict(self._entries), _discovered=self.group is None)
        return copied

    def register(self, name: str, value: T | Reference) -> None:
        """Make ``value`` available as ``name``; registering the same thing again changes nothing.

        Raises:
            ``taken_error``: something else has the name.
        """
        known = self._entries.get(name)
        if known is None or _same(known, value):
            self._entries[name] = value
            return
        shown = known.target if isinstance(known, Reference) else getattr(known, "__qualname__", repr(known))
        message = self._taken.format(kind=self.kind, name=name, known=shown)
        if self._taken_error is not None:
            raise self._taken_error(message)
        raise self._error(message, hint=f"give the new {self.kind} its own name")

    def names(self, *, plugins: bool = True) -> tuple[str, ...]:
        """Every name, in the order they were added (the built-in ones first, then the installed plugins'
        and those registered since); no plugin is imported. ``plugins=False``: without the installed plugins'
        names not imported yet, so that what :meth:`get` gives of each name imports no plugin."""
        self._discover()
        return tuple(
            name for name, entry in self._entries.items()
            if plugins or not (isinstance(entry, Reference) and entry.origin is not None)
        )

    def get(self, name: str) -> T:
        """The object registered as ``name``, importing it on first use.

        Raises:
            ``error``: no such name (the hint lists the known ones), or its entry point does not load.
        """
        self._discover()
        entry = self._entries.get(name)
        if entry is None:
            names = ", ".join(self._entries)
            hint = f"choose one of: {names}" + (f"; {self._how_to_add}" if self._how_to_add else "")
            raise self._error(self._unknown.format(kind=self.kind, name=name, names=names), hint=hint)
        if isinstance(entry, Reference):
            loaded = self._load(name, entry)
            # a module that registers its own classes (a decorator) has put the same object here already
            self._entries[name] = loaded
            return loaded
        return entry

    def _load(self, name: str, reference: Reference) -> T:
        """The object ``reference`` points to, checked to be a ``expected`` called ``name``."""
        module, _, attribute = reference.target.partition(":")
        try:
            value: Any = importlib.import_module(module)
            for part in attribute.split("."):
                value = getattr(value, part)
        except Exception as exc:  # a plugin's import may fail any way; say whose it is
            if reference.origin is None:
                raise
            raise self._error(
                f"{self.kind} {name!r} ({reference.target}, from {reference.origin}) does not load: "
                f"{type(exc).__name__}: {exc}",
                hint=f"reinstall {reference.origin}, or uninstall it",
            ) from exc
        if self._expected is not None and not (isinstance(value, type) and issubclass(value, self._expected)):
            raise self._error(
                f"{self.kind} {name!r} ({reference.target}, from {reference.origin}) is not a "
                f"{self._expected.__name__} subclass",
                hint=f"its entry point must name a {self._expected.__name__} subclass",
            )
        called = getattr(value, "name", name)
        if called != name:
            raise self._error(
                f"{self.kind} {name!r} ({reference.target}, from {reference.origin}) is called {called!r}",
                hint="the entry point's name and the class's name attribute must be the same",
            )
        return value  # checked above as far as a runtime check can: a subclass of expected, called name

    def _discover(self) -> None:
        """Add the installed distributions' entry points of :attr:`group`, once, as references. A name
        taken already keeps its entry (a plugin cannot replace a built-in); the plugin's is logged."""
        if self._discovered:
            return
        self._discovered = True
        assert self.group is not None  # a registry without a group starts discovered
        for point in entry_points(group=self.group):
            origin = point.dist.name if point.dist is not None else point.value
            reference = Reference(point.value, origin)
            known = self._entries.get(point.name)
            if known is None:
                self._entries[point.name] = reference
            elif not _same(known, reference):
                logger.warning("%s %r from %s (%s) is ignored: the name is taken", self.kind, point.name, origin,
                               point.value)
