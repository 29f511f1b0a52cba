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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub_soup.errors import AlignmentError, RecipeError

# The input index of the base model (as :data:`hub_soup.merging.plan.BASE`, which imports torch).
BASE = -1

# The files a tokenizer's vocabulary is read from, in the order they are tried.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")

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

    def stripped(self, rows: int) -> TokenizerFiles:
        """Only the tokens whose id is a row of the model's embeddings (mergekit's stripped tokenizer)."""
        return TokenizerFiles({t: i for t, i in self.vocab.items() if i < rows},
                              {t: e for t, e in self.added.items() if self.vocab.get(t, rows) < rows})


#: The files :func:`read_tokenizer` reads a vocabulary from (fetched alone, before any weights, for a Hub model).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json", "tokenizer_config.json")


def read_tokenizer(paths: Sequence[Path], label: str) -> TokenizerFiles:
    """A model's vocabulary from its tokenizer files (``paths``: its side files).

    Raises:
        AlignmentError: none of the files a vocabulary is read from is there.
    """
    by_name = {p.name: p for p in paths}
    vocab: dict[str, int] = {}
    added: dict[str, dict[str, Any]] = {}
    if "tokenizer.json" in by_name:
        data = json.loads(by_name["tokenizer.json"].read_text(encoding="utf-8"))
        vocab.update(_model_vocab(data))
        for entry in data.get("added_tokens") or []:
            vocab[entry["content"]] = entry["id"]
            added[entry["content"]] = dict(entry)
    elif "vocab.json" in by_name:
        vocab.update(json.loads(by_name["vocab.json"].read_text(encoding="utf-8")))
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
        tokens: soup token -> soup row (ids ``0 .. len(tokens) - 1``).
        added: the soup's added tokens and their tokenizer.json entries (ids the soup's).
        size: rows of the soup's token-indexed tensors (``len(tokens)``, padded up).
        rows: per input, one entry per soup row.
        fills: per input, the rows it lacks, as filled.
        rules: per token not every input has (or overridden): how its fills were chosen
            (``donor <label>``, ``base``, ``average``, ``source <label>``, ``forced <label>``, ``zero``).
        sizes: per input, the embedding rows it has (its config's ``vocab_size``).
    """

    source: str
    origin: int
    tokens: dict[str, int]
    added: dict[str, dict[str, Any]]
    size: int
    rows: dict[int, tuple[int, ...]]
    fills: dict[int, tuple[Fill, ...]]
    rules: dict[str, str]
    sizes: dict[int, int]

    @property
    def padded(self) -> int:
        """Rows added by ``pad_to_multiple_of`` (each model's mean row)."""
        return self.size - len(self.tokens)

    def counts(self) -> dict[str, int]:
        """How many soup rows each rule filled (every model's own row, a donor's, the base's, an average...)."""
        counts = {"every model's own row": len(self.tokens) - len(self.rules)}
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
        tokens, added = dict(stripped[origin].vocab), dict(stripped[origin].added)
    elif choice.source == "union":
        chosen = origin
        tokens, added = _union(stripped, models)
    else:
        chosen = _named(choice.source, labels, "tokenizer source")
        tokens, added = dict(tokenizers[chosen].vocab), dict(tokenizers[chosen].added)
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise AlignmentError(
            f"the tokenizer of {labels[chosen]} leaves ids unused: its vocabulary is not one row per token",
            hint="choose another tokenizer source",
        )
    settings = {token: setting for token, setting in choice.tokens.items() if token in tokens}
    fill_of: dict[str, Fill] = {}
    forced: set[str] = set()
    rules: dict[str, str] = {}
    for token in sorted(tokens, key=tokens.__getitem__):
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
    rows: dict[int, tuple[int, ...]] = {}
    fills: dict[int, tuple[Fill, ...]] = {}
    for i in models:
        own = stripped[i].vocab
        mine: list[Fill] = []
        index: dict[Fill, int] = {}
        selected: list[int] = []
        for token in sorted(tokens, key=tokens.__getitem__):
            if token in own and token not in forced:
                selected.append(own[token])
                continue
            fill = fill_of[token]
            if fill not in index:
                index[fill] = len(mine)
                mine.append(fill)
            selected.append(-1 - index[fill])
        if size > len(tokens):
            mine.append(Fill(mean=True))
            selected.extend([-len(mine)] * (size - len(tokens)))
        rows[i], fills[i] = tuple(selected), tuple(mine)
    return Vocabulary(choice.source, chosen, tokens, added, size, rows, fills, rules, dict(sizes))


def _union(stripped: Mapping[int, TokenizerFiles], models: Sequence[int]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """mergekit's ``build_union_tokenizer``: the first model's tokens, then every other model's plain tokens it
    lacks, then every model's added tokens it lacks (model by model, each in id order), at the next ids."""
    first = stripped[models[0]]
    tokens, added = dict(first.vocab), dict(first.added)
    deferred = {t for i in models for t in stripped[i].added}
    plain = [t for i in models for t in sorted(stripped[i].vocab, key=stripped[i].vocab.__getitem__)
             if t not in stripped[i].added]
    extra = [(t, stripped[i].added[t]) for i in models
             for t in sorted(stripped[i].added, key=stripped[i].vocab.__getitem__)]
    for token in plain:
        if token not in tokens and token not in deferred:
            tokens[token] = len(tokens)
            added[token] = {"content": token, "special": False}
    for token, entry in extra:
        if token not in tokens:
            tokens[token] = len(tokens)
            added[token] = dict(entry)
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


def soup_tokenizer_files(paths: Sequence[Path], vocabulary: Vocabulary, label: str) -> dict[str, str | Path]:
    """The soup's tokenizer files, made from those of the model its vocabulary is built on (``paths``: that
    model's side files, ``label`` its name): every token of :attr:`Vocabulary.tokens` at its soup row. Tokens
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
    model = _model_vocab(data)
    beyond = [token for token, index in model.items() if vocabulary.tokens.get(token) != index]
    if beyond:
        raise AlignmentError(
            f"the tokenizer of {label} holds {len(beyond)} tokens beyond its embeddings (e.g. {beyond[0]!r})",
            hint="choose another tokenizer source (base, union, or another model)",
        )
    given = data.get("added_tokens") or []
    kept = [e for e in given if vocabulary.tokens.get(e["content"]) == e["id"]]
    dropped = {e["id"] for e in given} - {e["id"] for e in kept}
    known = set(model) | {e["content"] for e in kept}
    new = [token for token in sorted(vocabulary.tokens, key=vocabulary.tokens.__getitem__) if token not in known]
    if not new and not dropped:
        return files
    entries = [_added_entry(token, vocabulary) for token in new]
    data["added_tokens"] = [*kept, *entries]
    files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    files.pop("added_tokens.json", None)  # its ids are the model's; tokenizer.json says every added token
    if "tokenizer_config.json" in files:
        config = json.loads(Path(files["tokenizer_config.json"]).read_text(encoding="utf-8"))
        decoder = {k: v for k, v in (config.get("added_tokens_decoder") or {}).items() if int(k) not in dropped}
        for entry in entries:
            decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        config["added_tokens_decoder"] = decoder
        files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    return files


# The files of a tokenizer the soup writes (its other side files come from where they always do).
_TOKENIZER_GROUP = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "tokenizer.model")


def _model_vocab(data: Mapping[str, Any]) -> dict[str, int]:
    """A tokenizer.json's model vocabulary, token -> id (a Unigram model's pieces are in id order)."""
    entries = (data.get("model") or {}).get("vocab") or {}
    return {piece: index for index, (piece, _score) in enumerate(entries)} if isinstance(entries, list) else dict(entries)


def _added_entry(token: str, vocabulary: Vocabulary) -> dict[str, Any]:
    """A tokenizer.json ``added_tokens`` entry of ``token`` at its soup id."""
    given = vocabulary.added.get(token, {})
    special = bool(given.get("special", False))
    return {
        "id": vocabulary.tokens[token], "content": token, "single_word": bool(given.get("single_word", False)),
        "lstrip": bool(given.get("lstrip", False)), "rstrip": bool(given.get("rstrip", False)),
        "normalized": bool(given.get("normalized", not special)), "special": special,
    }


def soup_token_ids(config: dict[str, Any], reference: TokenizerFiles, vocabulary: Vocabulary) -> dict[str, Any]:
    """``config`` (the reference model's ``config.json`` or ``generation_config.json``) with its special token
    ids (``bos_token_id``, ...) moved to the soup rows of the same tokens (``None`` where the soup lacks one)."""
    by_id = {index: token for token, index in reference.vocab.items()}
    config = dict(config)
    for key in [k for k in config if k.endswith("_token_id")]:
        value = config[key]
        if isinstance(value, int):
            config[key] = vocabulary.tokens.get(by_id.get(value, ""))
        elif isinstance(value, list):
            config[key] = [vocabulary.tokens.get(by_id.get(v, "")) for v in value]
    return config
