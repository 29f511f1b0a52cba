"""Merge methods: one file per method, a registry by name.

A method is one class (:class:`MergeMethod`) in a file of its own. The built-in ones are
named in the registry below (``name: "module:Class"``, imported when first used); an
installed package declares its own under the entry-point group ``hub_soup.methods``
(:mod:`hub_soup.registry`), and a script or a test registers one with :func:`register_method`.
It declares what a recipe must give it: its ``Parameters`` (a pydantic model, so
the recipe validates them before anything is downloaded), whether it needs a base
model, whether it weighs each ingredient; and it computes the soup one block of
elements at a time in :meth:`MergeMethod.kernel`. The streamed engine
(:func:`hub_soup.merging.engine.stream_merge`) is the only caller of kernels, for
the soup it writes and for the soups evaluation, greedy and diagnose score, so a
scored soup is bit for bit the soup that is written.

Importing this package (and the method files) imports no torch: recipe validation
and ``hub-soup schema`` use the registry. Kernels work with tensor methods on the
tensors they are given; torch types appear only under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hub_soup.errors import RecipeError
from hub_soup.registry import METHODS_GROUP, Registry
from hub_soup.threads import current_part

if TYPE_CHECKING:
    import torch


class NoParameters(BaseModel):
    """A method's parameters: none by default, and unknown ones are errors (a typo must not pass)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class MergedTensor:
    """The tensor a method's statistics and kernel calls are about, as the engine merges it.

    Attributes:
        key: its name in the soup (for warnings, and for anything a method derives per tensor,
            such as DARE's random stream).
        numel: its number of elements.
        dtype: the dtype its kernel computes in (``acc`` and ``scratch``), float32 or float64.
        shape: its shape in the soup (``None``: flat, ``(numel,)``), which says where its rows are for a
            method that works on whole rows (:meth:`MergeMethod.row_elements`).
    """

    key: str
    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...] | None = None

    @property
    def dims(self) -> tuple[int, ...]:
        """:attr:`shape`, or ``(numel,)`` where none was given."""
        return (self.numel,) if self.shape is None else self.shape


class MergeMethod:
    """One way to combine aligned tensors; an instance is one merge's method, its parameters and weights.

    Subclasses set the class attributes and override :meth:`kernel` (and, for a
    statistics pass, :meth:`start_statistics` and :meth:`observe`).

    Per tensor, the engine calls :meth:`start_statistics`, then for each of
    :meth:`statistics_passes` reads of the tensor :meth:`observe` on every chunk and
    :meth:`finish_statistics` at the end, and finally :meth:`kernel` on every block, with
    what the last call returned: a method's per-tensor state flows through that one value. A method
    whose definition works on whole rows (a rank or an angle per row) says how long a row is
    (:meth:`row_elements`): every chunk and block it is given is then whole rows. A
    :attr:`whole_tensor` method is instead given each tensor whole, in :meth:`merge_tensor`. A tensor
    whose plan gives it its own parameters is merged by :meth:`for_tensor`'s method.

    Attributes:
        name: what a recipe's ``method`` says.
        Parameters: the pydantic model of a recipe's ``parameters`` (``extra="forbid"``).
        needs_base: the kernel is given the base model's block (a recipe then needs ``base``,
            and refuses one otherwise).
        optional_base: the method takes a base where one is given and works without one (mergekit's
            optional base: ``nuslerp`` and ``multislerp`` interpolate task vectors with one, the models
            themselves without); its kernel is given the base's block exactly when the plan has a base.
        uses_weights: the method weighs each ingredient (a recipe then gives ``weight`` on every
            ingredient, unless :attr:`default_weight` says what a missing one is; weights are
            refused otherwise).
        ingredient_parameters: the fields of :attr:`Parameters` an ingredient may set for itself
            (mergekit's per-model parameters, such as ``density``); the recipe's ``parameters``
            give the value of every ingredient that does not (see :meth:`per_ingredient`).
        default_weight: the weight of an ingredient whose recipe gives none (``None``: every
            ingredient needs one). Only for methods that use weights.
        normalizes_weights: :attr:`weights` are normalised to sum to one (a weighted average);
            ``False`` keeps them as given (task arithmetic scales each task vector by its weight).
        title, paper, summary: what the soup's card says: the method's name in words, a Markdown
            link to its paper, and one sentence on what it did to the ingredients. Without a
            ``summary`` the card calls the soup a weight average (``uniform``, ``weighted``).
            A method with a ``normalize`` parameter says where it divides with ``{divided}`` in its
            summary, and by what in :attr:`divisor` (see :meth:`card_summary`).
        exact_ingredients: the number of ingredients the method merges, for a method that takes a
            fixed number (``slerp``: 2); ``None``, the default: any number (a recipe gives two or more).
            A recipe with another number is refused, and so is a greedy one (greedy tries subsets).
        min_ingredients: the fewest ingredients the method merges (2; 1 for a method whose soup of one
            fine-tune and its base is meaningful: task arithmetic of one task vector, negation included).
        averages: the soup is a weighted mean of the ingredients alone (no base), so the soup of one
            ingredient is that ingredient bit for bit (greedy's first step reuses its score).
        float64_kernel: the kernel's ``acc`` and ``scratch`` are float64 whatever the tensors' dtypes,
            for a method whose per-tensor factors would cost float32 arithmetic more than an output
            ulp: its soup is then its float64 definition rounded once to the output dtype.
        whole_tensor: the method's definition needs each tensor whole and cannot be computed in passes over
            its chunks (a decomposition): the engine reads every input of a merged tensor in full and
            calls :meth:`merge_tensor` once per tensor instead of :meth:`kernel` per block (and no
            statistics passes). Memory is then the inputs of the largest tensor (the ingredients' and
            the base's, in their stored dtypes) and what ``merge_tensor`` computes, not a few blocks.
        compute_bound: the kernel or statistics spend their time computing (sorting each row, softmaxes,
            order statistics, float64 dot products), not moving bytes: the merge then runs on every CPU this
            process may use (:func:`~hub_soup.threads.merge_threads`), where an elementwise merge is fastest
            on one. Its kernel's blocks are split among compute workers (so a kernel keeps what it shares
            across blocks in :meth:`workspace` s, or under a lock), and its :meth:`observe` may split a chunk
            with :func:`~hub_soup.threads.in_parts`.
        position_bytes: input bytes per chunk position for a merge split among compute workers, where the
            engine's default (:data:`~hub_soup.merging.engine.POSITION_BYTES`) hands work between threads too
            often for how little there is of it per element (``None``: the default).
    """

    name: ClassVar[str]
    Parameters: ClassVar[type[BaseModel]] = NoParameters
    needs_base: ClassVar[bool] = False
    optional_base: ClassVar[bool] = False
    uses_weights: ClassVar[bool] = False
    ingredient_parameters: ClassVar[tuple[str, ...]] = ()
    exact_ingredients: ClassVar[int | None] = None
    min_ingredients: ClassVar[int] = 2
    float64_kernel: ClassVar[bool] = False
    whole_tensor: ClassVar[bool] = False
    compute_bound: ClassVar[bool] = False
    position_bytes: ClassVar[int | None] = None
    averages: ClassVar[bool] = False
    default_weight: ClassVar[float | None] = None
    normalizes_weights: ClassVar[bool] = True
    title: ClassVar[str | None] = None
    paper: ClassVar[str | None] = None
    summary: ClassVar[str | None] = None
    divisor: ClassVar[str | None] = None

    def copies(self) -> bool:
        """Whether the soup of a tensor is its one input unchanged (``passthrough`` without a ``scale``): the
        engine then copies it, rounded once to the output dtype, as the kernel's float64 would round it."""
        return False

    @classmethod
    def takes_base(cls) -> bool:
        """Whether a base given to this method is used (required or optional): the one rule the recipe, the
        engine, the card and the mergekit reader ask."""
        return cls.needs_base or cls.optional_base

    def __init__(self, parameters: BaseModel | dict[str, Any] | None = None,
                 weights: Sequence[float] | None = None,
                 ingredients: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.parameters = self.parameters_from(parameters or {})
        self.ingredients = [self._ingredient_parameters(i, given) for i, given in enumerate(ingredients or ())]
        if self.uses_weights and weights is None and self.default_weight is None:
            raise RecipeError(f"method {self.name} needs a weight on every ingredient", hint="give weight: on each")
        self.weights = self._weights_from(weights)
        self._scalars: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._workspace: dict[tuple[Any, ...], torch.Tensor] = {}
        self._per_tensor: dict[tuple[Any, ...], MergeMethod] = {}

    def _weights_from(self, weights: Sequence[float] | None) -> list[float] | None:
        """The weights as the method counts them: normalised (a weighted average), or as given."""
        if not self.uses_weights and weights is not None:
            raise RecipeError(f"method {self.name} takes no weights, got {list(weights)}", hint="drop the weights")
        if weights is not None and not self.normalizes_weights:
            if not all(math.isfinite(w) for w in weights):
                raise RecipeError(f"weights must be finite: {list(weights)}")
            return [float(w) for w in weights]
        return normalize_weights(weights, len(weights)) if weights is not None else None

    def for_tensor(self, parameters: Mapping[str, Any]) -> MergeMethod:
        """This merge's method with one tensor's own parameters (a plan's
        :attr:`~hub_soup.merging.plan.TensorPlan.parameters`) over the merge's: a value replaces the recipe's
        ``parameters`` value (an ingredient's own still counts over it), a list gives each input its own value
        of a per-ingredient parameter (``weight`` too). ``self`` where there are none; made once per distinct
        set, sharing this one's scratch buffers, so every tensor's kernel runs as fast as the merge's."""
        if not parameters:
            return self
        key = tuple(sorted((name, tuple(v) if isinstance(v, (list, tuple)) else v) for name, v in parameters.items()))
        found = self._per_tensor.get(key)
        if found is None:
            found = self._per_tensor[key] = self._with_parameters(parameters)
        return found

    def _with_parameters(self, parameters: Mapping[str, Any]) -> MergeMethod:
        derived = copy.copy(self)  # shares _scalars and _workspace; its own state is replaced below
        for klass in type(self).__mro__:  # values cached from the merge's parameters are not this tensor's
            for name, attribute in vars(klass).items():
                if isinstance(attribute, functools.cached_property):
                    derived.__dict__.pop(name, None)
        derived._per_tensor = {}
        lists = {name: list(v) for name, v in parameters.items() if isinstance(v, (list, tuple))}
        values = {name: v for name, v in parameters.items() if name not in lists}
        if "weight" in values:
            raise RecipeError(f"method {self.name}: a tensor's weight is one per input, got {values['weight']!r}")
        weights = lists.pop("weight", None)
        try:
            derived.parameters = self.parameters_from(self.parameters.model_dump(by_alias=True) | values)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RecipeError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if weights is not None:
            derived.weights = derived._weights_from(weights)
        if lists:
            count = {len(v) for v in lists.values()}
            if len(count) != 1 or (self.ingredients and len(self.ingredients) != count.copy().pop()):
                raise RecipeError(f"method {self.name}: per-input parameters of different lengths: {lists}")
            own = self.ingredients or [{} for _ in range(count.pop())]
            derived.ingredients = [
                derived._ingredient_parameters(i, {**given, **{name: v[i] for name, v in lists.items()}})
                for i, given in enumerate(own)
            ]
        return derived

    def card_summary(self) -> str | None:
        """:attr:`summary`, true of this merge's parameters: its ``{divided}`` names the :attr:`divisor`
        when ``normalize`` divided by it, and says nothing when ``normalize`` is off."""
        if self.summary is None or self.divisor is None:
            return self.summary
        normalized = self.parameters.normalize  # type: ignore[attr-defined]  # a method with a divisor has it
        divided = f", divided by {self.divisor} (normalize)" if normalized else ""
        return self.summary.replace("{divided}", divided)

    def weights_for(self, count: int) -> list[float]:
        """The weight each of ``count`` ingredients counts with: :attr:`weights` when given, else
        :attr:`default_weight` each, else (a method that weighs none) ``1 / count`` each."""
        if self.weights is not None:
            if len(self.weights) != count:
                raise RecipeError(f"got {len(self.weights)} weights for {count} ingredients")
            return list(self.weights)
        if self.uses_weights and self.default_weight is not None:
            return [self.default_weight] * count
        return normalize_weights(None, count)

    def per_ingredient(self, name: str, count: int) -> list[Any]:
        """Each of ``count`` ingredients' value of parameter ``name``: its own where it set one
        (:attr:`ingredient_parameters`), else the recipe's ``parameters`` (or the default)."""
        if self.ingredients and len(self.ingredients) != count:
            raise RecipeError(f"got parameters for {len(self.ingredients)} ingredients, merging {count}")
        default = getattr(self.parameters, name)
        return [own.get(name, default) for own in self.ingredients] if self.ingredients else [default] * count

    def _ingredient_parameters(self, index: int, given: Mapping[str, Any]) -> dict[str, Any]:
        """One ingredient's own parameters, validated as :attr:`Parameters` validates them."""
        given = {name: value for name, value in given.items() if value is not None}
        unknown = set(given) - set(self.ingredient_parameters)
        if unknown:
            takes = ", ".join(self.ingredient_parameters) or "none"
            raise RecipeError(
                f"ingredients.{index}: method {self.name} takes no per-ingredient {', '.join(sorted(unknown))}",
                hint=f"its per-ingredient parameters: {takes}",
            )
        merged = self.parameters.model_dump(by_alias=True) | given
        try:
            checked = self.Parameters.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RecipeError(f"ingredients.{index}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return {name: getattr(checked, name) for name in given}

    @classmethod
    def parameters_from(cls, parameters: BaseModel | dict[str, Any]) -> BaseModel:
        """Validated :attr:`Parameters` (pydantic's ``ValidationError`` names the field)."""
        return parameters if isinstance(parameters, cls.Parameters) else cls.Parameters.model_validate(parameters)

    def statistics_passes(self, dtype: torch.dtype) -> int:
        """How many times the engine reads each merged tensor, computed in ``dtype``, before its kernel runs:
        1 for a method that overrides :meth:`observe` (it looks at whole tensors), 0 otherwise. Each
        pass is one more read of the tensor's chunks through the same read-ahead, at flat memory."""
        return 0 if type(self).observe is MergeMethod.observe else 1

    def passes_left(self, statistics: Any) -> int | None:
        """Statistics passes still to read of the tensor after those finished, where ``statistics`` (after
        :meth:`finish_statistics`) know them fewer than :meth:`statistics_passes` said: the engine reads no more
        (an order statistic found before its last radix digit, as a rule). A bound that later passes may lower;
        ``None``: all of them. The passes skipped are the last ones: the next pass observed is the one after."""
        return None

    def row_elements(self, shape: tuple[int, ...]) -> int:
        """Elements of one row of a tensor of ``shape``, for a method whose kernel needs whole rows (DELLA's
        rank by magnitude in each row, an angle per row): the engine then cuts that tensor's chunks and
        blocks at whole rows only, so each kernel call (and each :meth:`observe`) is given whole rows, its
        ``offset`` a multiple of this, and the tensor's shape is :attr:`MergedTensor.shape`. Memory stays
        a few chunks of whole rows (a row longer than a chunk is a chunk of its own), never the tensor.
        1, the default: any cut (an elementwise kernel)."""
        return 1

    def start_statistics(self, tensor: MergedTensor) -> Any:
        """The state of one tensor's merge, before its first pass (and the kernel's, with no passes)."""
        return None

    def observe(self, statistics: Any, parts: Sequence[torch.Tensor], base: torch.Tensor | None) -> Any:
        """Fold one chunk of every ingredient (and of the base) into ``statistics`` and return them;
        the engine passes what the pass's last chunk returned to :meth:`finish_statistics`.

        ``parts`` and ``base`` are read-only: the engine may give a later pass and the kernel the same
        memory (a tensor of a few tens of MiB is read once, not once per pass)."""
        return statistics

    def finish_statistics(self, statistics: Any, tensor: MergedTensor) -> Any:
        """Called at the end of each pass with what the last :meth:`observe` returned: its result is what
        the next pass folds into, and after the last pass what the kernel calls are given (the default:
        ``statistics``, unchanged). ``tensor.key`` names the tensor in warnings."""
        return statistics

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        """Fill ``acc`` with the soup of one block of elements.

        ``parts`` are every ingredient's block of the same elements, in recipe order, in their
        stored dtypes; ``base`` is the base's block (methods that need one). ``acc`` and
        ``scratch`` are alike: float32 (float64 when an input or the output is float64, or the
        method sets :attr:`float64_kernel`), at
        most a few hundred KiB so that they stay in the CPU's cache. ``offset`` is the index
        of the block's first element in the (flattened) tensor. A kernel must be elementwise
        in effect: an element's result may depend on its values, its index and the tensor's
        statistics (and, for a method with rows, :meth:`row_elements`, on its row's values), never on
        where the engine cut the tensor into blocks.
        """
        raise NotImplementedError

    def merge_tensor(self, parts: Sequence[torch.Tensor], base: torch.Tensor | None, tensor: MergedTensor
                     ) -> torch.Tensor:
        """The soup of one whole tensor, for a :attr:`whole_tensor` method.

        ``parts`` are every input's tensor, shaped as the soup's, in their stored dtypes (``base``
        the base's, for a method that needs one); the result has that shape, in ``tensor.dtype``
        (float64 for a :attr:`float64_kernel` method) or wider: the engine rounds it once to the
        output dtype and checks it as it checks a kernel's blocks. The parts are the engine's
        buffers: read them, do not keep them.
        """
        raise NotImplementedError

    def scalars(self, values: Sequence[float], like: torch.Tensor) -> list[torch.Tensor]:
        """``values`` as 0-dim tensors of ``like``'s dtype and device, made once per merge.

        ``t.mul_(w)`` gives the same bits for a Python float and for a 0-dim tensor of
        ``t``'s dtype (both multiply in that dtype, tests check), but the tensor skips a
        slow wrapped-scalar path: 3-5x faster on cache-sized blocks.
        """
        key = (tuple(values), like.dtype, like.device)
        found = self._scalars.get(key)
        if found is None:
            found = self._scalars[key] = [like.new_tensor(v) for v in values]
        return found

    def workspace(self, name: str, like: torch.Tensor, count: int = 1, dtype: torch.dtype | None = None
                  ) -> list[torch.Tensor]:
        """``count`` scratch buffers called ``name``, of ``like``'s size and device (and dtype, unless ``dtype``
        says otherwise), beyond ``acc`` and ``scratch``, for a kernel that keeps more per block (TIES keeps each
        ingredient's sparsified task vector); made once per merge and reused, so memory stays a few blocks
        whatever the model's size. Calls with the same name, dtype and device get the same buffers (in the same
        compute worker: parts of a block run side by side, :func:`~hub_soup.threads.in_parts`)."""
        dtype = dtype or like.dtype
        key = (name, dtype, like.device, count, current_part())
        found = self._workspace.get(key)
        if found is None or found.shape[1] < like.numel():
            found = self._workspace[key] = like.new_empty(count, like.numel(), dtype=dtype)
        return [row[: like.numel()] for row in found]


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights that sum to one (uniform when ``None``); refuses negative or all-zero weights."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise RecipeError(f"got {len(weights)} weights for {count} ingredients", hint="give one weight per ingredient")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise RecipeError(f"weights must be finite, non-negative and not all zero: {list(weights)}")
    total = math.fsum(weights)
    return [w / total for w in weights]


_REGISTRY: Registry[type[MergeMethod]] = Registry(
    "merge method", error=RecipeError, group=METHODS_GROUP, expected=MergeMethod,
    # registering a class under a taken name is the plugin author's mistake, seen when the class is defined
    taken="a {kind} named {name!r} is registered already ({known})", taken_error=ValueError,
    how_to_add=f"or install a package that adds one (entry points {METHODS_GROUP!r})",
    references={  # the built-in methods, by name (the order messages list them in): a file here and a line here
        name: f"hub_soup.merging.methods.{name}:{cls}"
        for name, cls in (
            ("arcee_fusion", "ArceeFusion"),
            ("breadcrumbs", "Breadcrumbs"),
            ("breadcrumbs_ties", "BreadcrumbsTies"),
            ("dare_linear", "DareLinear"),
            ("dare_ties", "DareTies"),
            ("della", "Della"),
            ("della_linear", "DellaLinear"),
            ("karcher", "Karcher"),
            ("linear", "Linear"),
            ("model_stock", "ModelStock"),
            ("multislerp", "Multislerp"),
            ("nearswap", "Nearswap"),
            ("nuslerp", "Nuslerp"),
            ("passthrough", "Passthrough"),
            ("ram", "Ram"),
            ("ramplus_tl", "RamPlusTL"),
            ("sce", "Sce"),
            ("slerp", "Slerp"),
            ("task_arithmetic", "TaskArithmetic"),
            ("ties", "Ties"),
            ("uniform", "Uniform"),
            ("weighted", "Weighted"),
        )
    },
)
M = TypeVar("M", bound=type[MergeMethod])


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``; refuses a name taken.

    An installed package can instead declare the class under the entry-point group
    ``hub_soup.methods``: recipes, ``--method`` and ``schema`` then know it without importing it."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute name = '...'")
    _REGISTRY.register(name, cls)
    return cls


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered as ``name`` (a plugin's is imported now)."""
    return _REGISTRY.get(name)


def method_names() -> tuple[str, ...]:
    """Every method's name: the built-in ones, then the registered ones, then the installed plugins'."""
    return _REGISTRY.names()


__all__ = ["MergeMethod", "MergedTensor", "NoParameters", "get_method", "method_names", "normalize_weights",
           "register_method"]
