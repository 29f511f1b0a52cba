"""The soup's vocabulary when the ingredients' vocabularies differ: which tokens, and where each row comes from.

Fine-tunes add tokens (chat markers, a pad token) and resize their embeddings, so row ``i``
of two ingredients' ``embed_tokens`` may mean different tokens, or exist in one only.
Averaging by index would be wrong; rows are aligned by token string instead, with
mergekit 0.1.5's meaning (``mergekit/tokenizer/build.py`` and ``embed.py``):

* ``tokenizer_source`` chooses the vocabulary: ``base`` (the base's tokenizer, or the first
  ingredient's without a base), ``union`` (that one, then every token another model has
  that it lacks: plain tokens first, then added tokens, model by model, in id order), or a
  model named (one of the ingredients or the base).
* Each model's token-indexed tensors are permuted into that vocabulary: a token the model
  has keeps the model's row; a token it lacks takes a *fill*: the one donor's row when a
  single model has it, the base's when the base has it, otherwise the average of the rows
  of those that have it (``assign_embedding_sources``); a zero row when none has it.
  Per-token overrides (``tokens: {"<tok>": {source: model, force: true}}``) give the fill
  from a named model (or another of its tokens, or zeros); ``force`` makes every model take it.
* ``pad_to_multiple_of`` rounds the row count up; each model's extra rows are the mean of
  its permuted rows.

The merge method then merges the permuted tensors as it merges any tensor. Everything
here is decided from the tokenizer files alone (``tokenizer.json``, ``tokenizer_config.json``,
``added_tokens.json``, ``vocab.json``): no torch, no weights.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_soup.errors import AlignmentError, RecipeError
from hub_soup.merging.rows import Gather

# The input index of the base model (as :data:`hub_soup.merging.plan.BASE`, which imports torch).
BASE = -1

# How each ``tokenizer_source`` reads, for messages and hints.
SOURCE_CHOICES = (
    "'base' (the base's vocabulary, or the first ingredient's)",
    "'union' (that one plus every token another ingredient adds)",
    "a model's name (its vocabulary)",
)
SOURCE_HINT = (
    "choose the soup's vocabulary with --tokenizer-source (recipe: tokenizer: {source: ...}): "
    + "; ".join(SOURCE_CHOICES) + "; rows are then aligned by token"
)


@dataclass(frozen=True)
class TokenSetting:
    """A per-token override (mergekit's ``TokenEmbeddingConfig``): where the row of ``token`` comes from.

    Attributes:
        source: the model whose row fills it (a label, ``"base"``), or ``"zero"``.
        token: that model's other token to take the row of (mergekit's ``kind: model_token``).
        force: every model takes that row, even those that have the token.
    """

    source: str
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerChoice:
    """What a recipe says of the soup's vocabulary (mergekit's ``tokenizer:`` section)."""

    source: str = "union"
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class TokenizerFiles:
    """One model's tokenizer as its files say: token -> id, which tokens were added, and their settings."""

    vocab: dict[str, int]
    added: dict[str, dict[str, Any]]  # added token -> its tokenizer.json entry (special, normalized, ...)

    def sharing(self, other: TokenizerFiles) -> TokenizerFiles:
        """This vocabulary holding ``other``'s token strings and ids where the two list the same tokens at the
        same ids first (a fine-tune and its base): read beside ``other``, it costs a table, not 150K more
        strings. Itself where they do not."""
        keys, theirs = list(self.vocab), list(other.vocab)
        n = min(len(keys), len(theirs))
        ids = list(other.vocab.values())[:n]
        if n == 0 or keys[:n] != theirs[:n] or list(self.vocab.values())[:n] != ids:
            return self
        vocab = dict(zip(theirs[:n], ids))
        vocab.update(itertools.islice(self.vocab.items(), n, None))
        return TokenizerFiles(vocab, self.added)

    def stripped(self, rows: int) -> TokenizerFiles:
        """Only the tokens whose id is a row of the model's embeddings (mergekit's stripped tokenizer)."""
        if max(self.vocab.values(), default=-1) < rows:
            return self
        return TokenizerFiles({t: i for t, i in self.vocab.items() if i < rows},
                              {t: e for t, e in self.added.items() if self.vocab.get(t, rows) < rows})


#: The files :func:`read_tokenizer` reads a vocabulary from (fetched alone, before any weights, for a Hub model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")


def read_tokenizer(paths: Sequence[Path], label: str, parsed: Mapping[str, Any] | None = None) -> TokenizerFiles:
    """A model's vocabulary from its tokenizer files (``paths``: its side files; ``parsed``: its tokenizer.json
    as already read, left as it is).

    Raises:
        AlignmentError: none of the files a vocabulary is read from is there.
    """
    by_name = {p.name: p for p in paths}
    vocab: dict[str, int]
    added: dict[str, dict[str, Any]] = {}
    if parsed is not None or "tokenizer.json" in by_name:
        if parsed is None:
            data = json.loads(by_name["tokenizer.json"].read_text(encoding="utf-8"))
            vocab = _model_vocab(data)
            data.pop("model", None)  # its merges: not kept while the rest is read
        else:
            data, vocab = parsed, dict(_model_vocab(parsed))
        for entry in data.get("added_tokens") or []:
            vocab[entry["content"]] = entry["id"]
            added[entry["content"]] = dict(entry)
    elif "vocab.json" in by_name:
        vocab = json.loads(by_name["vocab.json"].read_text(encoding="utf-8"))
    else:
        raise AlignmentError(
            f"{label} has no tokenizer.json or vocab.json: its rows cannot be aligned by token",
            hint="give every ingredient its tokenizer files, or merge ingredients of one vocabulary",
        )
    if "added_tokens.json" in by_name:
        for token, index in json.loads(by_name["added_tokens.json"].read_text(encoding="utf-8")).items():
            vocab[token] = index
            added.setdefault(token, {"id": index, "content": token, "special": True})
    if "tokenizer_config.json" in by_name:
        config = json.loads(by_name["tokenizer_config.json"].read_text(encoding="utf-8"))
        for index, entry in (config.get("added_tokens_decoder") or {}).items():
            vocab.setdefault(entry["content"], int(index))
            added.setdefault(entry["content"], {"id": int(index), **entry})
    return TokenizerFiles(vocab, added)


def vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """The embedding rows a model's ``config.json`` says it has (``vocab_size``, or its text model's)."""
    if not config:
        return None
    if isinstance(config.get("vocab_size"), int):
        return int(config["vocab_size"])
    text = config.get("text_config")
    return vocab_size(text) if isinstance(text, Mapping) else None


@dataclass(frozen=True)
class Fill:
    """A row a model lacks, as the soup fills it: the average of ``rows`` (each ``(input, row)``, an input
    being an ingredient's index or :data:`BASE`; one: a copy; none: zeros), or, ``mean``, the mean of the
    model's own permuted rows of the vocabulary (a padding row)."""

    rows: tuple[tuple[int, int], ...] = ()
    mean: bool = False


@dataclass(frozen=True)
class Vocabulary:
    """The soup's vocabulary and, per input (ingredient index or :data:`BASE`), the row of its token-indexed
    tensors each soup row takes: a row index, or ``-1 - j`` for ``fills[input][j]``.

    Attributes:
        source: the ``tokenizer_source`` it was chosen by.
        origin: the input whose tokenizer the soup's is built on.
        kept: the soup's tokens ``0 .. kept - 1`` are that tokenizer's, at the same ids.
        extra: the soup's tokens after those (those ``union`` adds) -> soup row. The whole vocabulary is
            not kept (150K strings, more memory than a streamed merge's buffers): :meth:`tokens` rebuilds it.
        added: the soup's added tokens and their tokenizer.json entries (ids the soup's).
        size: rows of the soup's token-indexed tensors (:attr:`count`, padded up).
        rows: per input, one entry per soup row (in runs: a model's own rows in order are one).
        fills: per input, the rows it lacks, as filled.
        rules: per token not every input has (or overridden): how its fills were chosen
            (``donor <label>``, ``base``, ``average``, ``source <label>``, ``forced <label>``, ``zero``).
        sizes: per input, the embedding rows it has (its config's ``vocab_size``).
    """

    source: str
    origin: int
    kept: int
    extra: dict[str, int]
    added: dict[str, dict[str, Any]]
    size: int
    rows: dict[int, Gather]
    fills: dict[int, tuple[Fill, ...]]
    rules: dict[str, str]
    sizes: dict[int, int]

    @property
    def count(self) -> int:
        """The soup's tokens (its rows but padding)."""
        return self.kept + len(self.extra)

    @property
    def padded(self) -> int:
        """Rows added by ``pad_to_multiple_of`` (each model's mean row)."""
        return self.size - self.count

    def tokens(self, origin: TokenizerFiles) -> dict[str, int]:
        """Soup token -> soup row (ids ``0 .. count - 1``), from the tokenizer :attr:`origin` has (read again).

        Raises:
            AlignmentError: that tokenizer is not the one the vocabulary was chosen from.
        """
        tokens = {token: index for token, index in origin.vocab.items() if index < self.kept}
        tokens.update(self.extra)
        if len(tokens) != self.count or len(set(tokens.values())) != self.count:
            raise AlignmentError(
                "the tokenizer files the soup's vocabulary was chosen from changed while the soup was made",
                hint="run the merge again",
            )
        return tokens

    def counts(self) -> dict[str, int]:
        """How many soup rows each rule filled (every model's own row, a donor's, the base's, an average...)."""
        counts = {"every model's own row": self.count - len(self.rules)}
        for rule in self.rules.values():
            counts[rule] = counts.get(rule, 0) + 1
        if self.padded:
            counts["padding (mean row)"] = self.padded
        return counts


def choose_vocabulary(
    tokenizers: Mapping[int, TokenizerFiles], sizes: Mapping[int, int], labels: Mapping[int, str],
    choice: TokenizerChoice,
) -> Vocabulary:
    """The soup's vocabulary and each input's rows in it, as mergekit 0.1.5 builds them.

    Args:
        tokenizers: each input's tokenizer (ingredients ``0 .. n-1`` in merge order, the base as :data:`BASE`).
        sizes: each input's embedding rows (tokens with ids beyond are not the model's).
        labels: each input's name, as a recipe names it (what ``source`` and overrides may name).
        choice: the recipe's ``tokenizer`` section.

    Raises:
        RecipeError: a source or override names no input, or an override's token is not its model's.
    """
    order = [i for i in tokenizers if i != BASE]
    origin = BASE if BASE in tokenizers else order[0]
    models = [origin, *(i for i in order if i != origin)]  # mergekit: the base (or first) first
    stripped = {i: tokenizers[i].stripped(sizes[i]) for i in models}
    if choice.source == "base":
        chosen = origin
        tokens, added = stripped[origin].vocab, dict(stripped[origin].added)
    elif choice.source == "union":
        chosen = origin
        tokens, added = _union(stripped, models)
    else:
        chosen = _named(choice.source, labels, "tokenizer source")
        tokens, added = tokenizers[chosen].vocab, dict(tokenizers[chosen].added)
    ordered = _in_id_order(tokens)
    if ordered is None:
        raise AlignmentError(
            f"the tokenizer of {labels[chosen]} leaves ids unused: its vocabulary is not one row per token",
            hint="choose another tokenizer source",
        )
    # Fine-tunes keep their base's tokens at their ids: soup rows below ``shared[i]`` are model i's own, in
    # order (one run), and only the tokens after the shortest such prefix are looked at one by one.
    prefixes: dict[int, int] = {}  # by tokenizer: models that share one (read once) are compared once
    for i in models:
        if id(stripped[i]) not in prefixes:
            prefixes[id(stripped[i])] = _shared_prefix(ordered, stripped[i].vocab)
    shared = {i: prefixes[id(stripped[i])] for i in models}
    settings = {token: setting for token, setting in choice.tokens.items() if token in tokens}
    examined = ordered[min(shared.values()):]
    if settings:
        examined = sorted({*examined, *settings}, key=tokens.__getitem__)
    fill_of: dict[str, Fill] = {}
    forced: set[str] = set()
    rules: dict[str, str] = {}
    for token in examined:
        having = [i for i in models if token in stripped[i].vocab]
        setting = settings.get(token)
        if setting is not None:
            source = _named(setting.source, labels, f"tokens.{token}.source") if setting.source != "zero" else None
            fill_of[token] = _override(token, setting, source, stripped, labels)
            rules[token] = "zero" if source is None else f"{'forced' if setting.force else 'source'} {labels[source]}"
            if setting.force:
                forced.add(token)
        elif len(having) == len(models):
            continue
        elif len(having) == 1:
            fill_of[token] = Fill(((having[0], stripped[having[0]].vocab[token]),))
            rules[token] = f"donor {labels[having[0]]}"
        elif not having:
            fill_of[token] = Fill()
            rules[token] = "zero"
        elif BASE in having:
            fill_of[token] = Fill(((BASE, stripped[BASE].vocab[token]),))
            rules[token] = "base"
        else:
            fill_of[token] = Fill(tuple((i, stripped[i].vocab[token]) for i in having))
            rules[token] = "average"
    size = len(tokens)
    if choice.pad_to_multiple_of:
        size = -(-size // choice.pad_to_multiple_of) * choice.pad_to_multiple_of
    rows: dict[int, Gather] = {}
    fills: dict[int, tuple[Fill, ...]] = {}
    forced_rows = sorted(tokens[token] for token in forced)
    for i in models:
        rows[i], fills[i] = _model_rows(ordered, stripped[i].vocab, shared[i], fill_of, forced, forced_rows, size)
    kept = len(stripped[chosen].vocab) if choice.source == "union" else len(tokens)
    extra = {token: index for token, index in tokens.items() if index >= kept} if kept < len(tokens) else {}
    return Vocabulary(choice.source, chosen, kept, extra, added, size, rows, fills, rules, dict(sizes))


def _model_rows(
    ordered: Sequence[str], own: Mapping[str, int], shared: int, fill_of: Mapping[str, Fill], forced: set[str],
    forced_rows: Sequence[int], size: int,
) -> tuple[Gather, tuple[Fill, ...]]:
    """One model's row of each soup token (``ordered``: the soup's tokens in id order, the first ``shared`` of
    them the model's own rows ``0 .. shared - 1``; ``forced_rows``: the soup rows of the ``forced`` tokens, in
    order), padded to ``size`` rows, and the fills those rows name: numbered as the soup's tokens first need
    them."""
    mine: list[Fill] = []
    index: dict[Fill, int] = {}

    def filled(token: str) -> int:
        fill = fill_of[token]
        if fill not in index:
            index[fill] = len(mine)
            mine.append(fill)
        return -1 - index[fill]

    parts: list[Iterable[int]] = []
    start = 0
    for cut in (row for row in forced_rows if row < shared):  # a forced token takes its fill even where shared
        parts += [range(start, cut), [filled(ordered[cut])]]
        start = cut + 1
    parts.append(range(start, shared))
    parts.append([own[t] if t in own and t not in forced else filled(t) for t in ordered[shared:]])
    if size > len(ordered):
        mine.append(Fill(mean=True))
        parts.append([-len(mine)] * (size - len(ordered)))
    return Gather.of(*parts), tuple(mine)


def _in_id_order(tokens: Mapping[str, int]) -> list[str] | None:
    """``tokens`` in id order, if their ids are ``0 .. len - 1`` (``None`` if some id is unused or repeated)."""
    ordered = list(tokens)
    if list(tokens.values()) == list(range(len(ordered))):
        return ordered
    ordered.sort(key=tokens.__getitem__)
    return ordered if [tokens[t] for t in ordered] == list(range(len(ordered))) else None


def _shared_prefix(ordered: Sequence[str], vocab: Mapping[str, int]) -> int:
    """How many of the soup's first tokens (``ordered``, in id order) ``vocab`` has at the same ids."""
    keys = list(vocab)
    n = min(len(ordered), len(keys))
    if keys[:n] == ordered[:n] and list(vocab.values())[:n] == list(range(n)):
        return n  # a tokenizer.json lists its vocabulary in id order: the common case, compared in C
    shared = 0
    for token in ordered:
        if vocab.get(token) != shared:
            break
        shared += 1
    return shared


def _union(stripped: Mapping[int, TokenizerFiles], models: Sequence[int]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """mergekit's ``build_union_tokenizer``: the first model's tokens, then every other model's plain tokens it
    lacks, then every model's added tokens it lacks (model by model, each in id order), at the next ids."""
    first = stripped[models[0]]
    tokens, added = dict(first.vocab), dict(first.added)
    deferred = {t for i in models for t in stripped[i].added}
    lacking: dict[int, list[str]] = {}  # what the first lacks: a few tokens each, found without sorting
    for i in models:                    # whole vocabularies (and once per tokenizer models share)
        same = next((j for j in lacking if stripped[j] is stripped[i]), None)
        lacking[i] = [] if stripped[i] is first else lacking[same] if same is not None else sorted(
            (t for t in stripped[i].vocab if t not in tokens), key=stripped[i].vocab.__getitem__)
    for i in models:
        for token in lacking[i]:
            if token not in tokens and token not in deferred:
                tokens[token] = len(tokens)
                added[token] = {"content": token, "special": False}
    for i in models:
        for token in lacking[i]:
            if token not in tokens and token in stripped[i].added:
                tokens[token] = len(tokens)
                added[token] = dict(stripped[i].added[token])
    for token, entry in added.items():
        added[token] = {**entry, "id": tokens[token]}
    return tokens, added


def _named(name: str, labels: Mapping[int, str], where: str) -> int:
    """The input ``name`` names: ``base``, or an ingredient's label (or its index)."""
    if name == "base" and BASE in labels:
        return BASE
    for index, label in labels.items():
        if name == label:
            return index
    if name.isdigit() and int(name) in labels:
        return int(name)
    raise RecipeError(
        f"{where}: {name!r} is none of the models merged",
        hint="name an ingredient as the recipe names it" + (", or base" if BASE in labels else ""),
    )


def _override(
    token: str, setting: TokenSetting, source: int | None, stripped: Mapping[int, TokenizerFiles],
    labels: Mapping[int, str],
) -> Fill:
    """The fill an override gives ``token``: its source model's row of it (or of ``setting.token``), or zeros."""
    if source is None:
        return Fill()
    wanted = setting.token if setting.token is not None else token
    row = stripped[source].vocab.get(wanted)
    if row is None:
        raise RecipeError(
            f"tokens.{token}: {labels[source]} has no token {wanted!r}",
            hint="name a model that has it, or a token of that model (token: ...)",
        )
    return Fill(((source, row),))


@dataclass(frozen=True)
class SoupTokenizer:
    """The soup's tokenizer: its files (a path, or a file's text, by name), its tokens (:meth:`Vocabulary.tokens`),
    and the tokenizer of the model it was made from (what that model's config ids name)."""

    files: dict[str, str | Path]
    tokens: dict[str, int]
    origin: TokenizerFiles


def soup_tokenizer_files(paths: Sequence[Path], vocabulary: Vocabulary, label: str) -> SoupTokenizer:
    """The soup's tokenizer, made from that of the model its vocabulary is built on (``paths``: that model's
    side files, ``label`` its name): every token at its soup row. Its tokenizer.json is read once for all. Tokens
    the union adds are added tokens there, as mergekit's ``add_tokens`` makes them (their settings the
    model's that added them); added tokens beyond the model's embeddings are dropped; files that need no
    change are copied.

    Raises:
        AlignmentError: the model has no tokenizer.json, or its model vocabulary holds tokens beyond its
            embeddings (which cannot be taken out of a tokenizer's merges here).
    """
    files: dict[str, str | Path] = {p.name: p for p in paths if p.name in _TOKENIZER_GROUP}
    if "tokenizer.json" not in files:
        raise AlignmentError(
            f"{label} has no tokenizer.json: the soup's tokenizer, in its vocabulary, cannot be written",
            hint="choose a tokenizer source whose model has a tokenizer.json",
        )
    data = json.loads(Path(files["tokenizer.json"]).read_text(encoding="utf-8"))
    origin = read_tokenizer(paths, label, parsed=data)
    tokens = vocabulary.tokens(origin)
    model = _model_vocab(data)
    beyond = [token for token, index in model.items() if tokens.get(token) != index]
    if beyond:
        raise AlignmentError(
            f"the tokenizer of {label} holds {len(beyond)} tokens beyond its embeddings (e.g. {beyond[0]!r})",
            hint="choose another tokenizer source (base, union, or another model)",
        )
    given = data.get("added_tokens") or []
    kept = [e for e in given if tokens.get(e["content"]) == e["id"]]
    dropped = {e["id"] for e in given} - {e["id"] for e in kept}
    known = {e["content"] for e in kept}
    new = [token for token in _in_id_order(tokens) or () if token not in model and token not in known]
    if not new and not dropped:
        return SoupTokenizer(files, tokens, origin)
    entries = [_added_entry(token, tokens[token], vocabulary) for token in new]
    data["added_tokens"] = [*kept, *entries]
    files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, separators=(",", ":"))  # compact: json.dumps with an indent is pure Python, 2x slower
    files.pop("added_tokens.json", None)  # its ids are the model's; tokenizer.json says every added token
    if "tokenizer_config.json" in files:
        config = json.loads(Path(files["tokenizer_config.json"]).read_text(encoding="utf-8"))
        decoder = {k: v for k, v in (config.get("added_tokens_decoder") or {}).items() if int(k) not in dropped}
        for entry in entries:
            decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        config["added_tokens_decoder"] = decoder
        files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    return SoupTokenizer(files, tokens, origin)


# The files of a tokenizer the soup writes (its other side files come from where they always do).
_TOKENIZER_GROUP = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "tokenizer.model")


def _model_vocab(data: Mapping[str, Any]) -> dict[str, int]:
    """A tokenizer.json's model vocabulary, token -> id (a Unigram model's pieces are in id order)."""
    entries = (data.get("model") or {}).get("vocab") or {}
    return {piece: index for index, (piece, _score) in enumerate(entries)} if isinstance(entries, list) else entries


def _added_entry(token: str, index: int, vocabulary: Vocabulary) -> dict[str, Any]:
    """A tokenizer.json ``added_tokens`` entry of ``token`` at its soup id ``index``."""
    given = vocabulary.added.get(token, {})
    special = bool(given.get("special", False))
    return {
        "id": index, "content": token, "single_word": bool(given.get("single_word", False)),
        "lstrip": bool(given.get("lstrip", False)), "rstrip": bool(given.get("rstrip", False)),
        "normalized": bool(given.get("normalized", not special)), "special": special,
    }


def special_token_ids(config: Mapping[str, Any]) -> set[int]:
    """The token ids a ``config.json`` or ``generation_config.json`` names (``bos_token_id``, ...)."""
    return {v for key, value in config.items() if key.endswith("_token_id")
            for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}


def soup_token_ids(config: dict[str, Any], by_id: Mapping[int, str], tokens: Mapping[str, int]) -> dict[str, Any]:
    """``config`` (the reference model's ``config.json`` or ``generation_config.json``) with its special token
    ids (``bos_token_id``, ...; ``by_id``: the reference's tokens of those ids) moved to the soup rows of the
    same tokens (``None`` where the soup lacks one)."""
    config = dict(config)
    for key in [k for k in config if k.endswith("_token_id")]:
        value = config[key]
        if isinstance(value, int):
            config[key] = tokens.get(by_id.get(value, ""))
        elif isinstance(value, list):
            config[key] = [tokens.get(by_id.get(v, "")) for v in value]
    return config
