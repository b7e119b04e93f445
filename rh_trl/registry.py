"""One entry point for every reward family: ``rh_trl.load(model)`` picks the reward class for a model.

    rm = rh_trl.load("Skywork/Skywork-Reward-V2-Llama-3.1-8B")         # -> ORM
    prm = rh_trl.load("Qwen/Qwen2.5-Math-PRM-7B", engine="vllm")        # -> PRM (separator), on vLLM
    prm = rh_trl.load("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data")          # -> PRM (next_token)
    pm = rh_trl.load("path/to/local/copy", family="pairwise")           # a class picked by hand
    drsow = rh_trl.load("drsow", strong="org/aligned", weak="org/base")  # -> DrSow

How the class is chosen, first match wins:

1. ``"drsow"`` builds :class:`~rh_trl.DrSow` from ``strong=`` and ``weak=``; ``family=`` names a class by hand.
2. The model registry, for a hub id (as given, or read from a hub-cache path
   ``…/models--org--name/snapshots/<rev>``): patterns (exact ids first, then globs such as
   ``"RLHFlow/Llama3.1-8B-PRM-*"``) mapped to a class and its options.
3. The model's own files, read without running any of its code: ``config.json`` (``architectures``,
   ``model_type``, ``num_labels``) and the tokenizer files' added and special tokens. Sequence classification
   → ORM; an architecture with an ORM adapter (ArmoRM, InternLM2-Reward) → ORM with that adapter;
   ``*ForProcessRewardModel`` (Qwen2.5-Math-PRM's custom code) or 2-label token classification with a
   ``<extra_0>`` token → PRM, separator family; a saved :class:`~rh_trl.CLoudModel` → CLoud.
4. For a local directory that is not a hub-cache snapshot, its name against the patterns' last part
   (``hf download org/name --local-dir name`` keeps the name). A name is weaker evidence than a config, so it
   decides only what the files leave open.

A causal LM alone does not say what it was trained for (a next-token PRM, a pairwise preference model and a
policy share architecture and tokenizer), so an unregistered one is an error that says how to choose:
``family="prm", kind="next_token"``, the class itself, or :func:`register_model`.

``engine="hf" | "vllm" | "openai"`` is passed to the class (every family takes it); a model the engine cannot run
(an ORM adapter's custom code on vLLM) is an error listing the engines it does run on. With
``engine="openai"`` the model is a server's URL (or a list of replicas' URLs) and the class is chosen from the
files of ``tokenizer=``, the model's directory or hub id. Other keyword arguments
go to the class unchanged and override the registry's options.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rh_trl.engines.vllm_llm import ENGINES
from rh_trl.models.catalog import (  # noqa: F401 - register_model, registered_models: public here too
    UPSTREAM_CLOUD,
    ModelEntry,
    hub_id_from_path,
    lookup,
    register_model,
    registered_models,
)
from rh_trl.models.loading import ModelLoadError, check_model_source, config_dict, is_offline
from rh_trl.options import check_options
from rh_trl.rewards.adapters import DEFAULT_ADAPTER, ORM_ADAPTERS
from rh_trl.rewards.base import Reward
from rh_trl.rewards.cloud import CLoud, CLoudConfig
from rh_trl.rewards.drsow import DrSow
from rh_trl.rewards.embedding import CONFIG_NAME as EMBEDDING_CONFIG
from rh_trl.rewards.embedding import load_embedding_rm
from rh_trl.rewards.factory import TINY_PREFIX, import_target, resolve_tiny
from rh_trl.rewards.orm import ORM
from rh_trl.rewards.pairwise import PairwisePM
from rh_trl.rewards.prm import DEFAULTS as PRM_DEFAULTS
from rh_trl.rewards.prm import PRM

logger = logging.getLogger("rh_trl")


#: ``family=`` names → classes
FAMILIES: dict[str, Callable[..., Reward]] = {
    "orm": ORM,
    "prm": PRM,
    "pairwise": PairwisePM,
    "cloud": CLoud,
    "drsow": DrSow,
    "embedding": load_embedding_rm,
}

#: files read to decide a model's class (small; never any code)
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")

SEPARATOR_TOKEN = PRM_DEFAULTS["separator"]["step_token"]

_HAND_PICK = (
    "Pick the class by hand: rh_trl.ORM(path) (sequence classification), "
    "rh_trl.PRM(path, kind='separator' | 'next_token' | 'step_tag'), rh_trl.PairwisePM(path), rh_trl.CLoud(path), "
    "rh_trl.DrSow(strong, weak); or rh_trl.load(path, family='prm', kind='next_token') (families: "
    f"{sorted(FAMILIES)}); or register it once: rh_trl.register_model('org/name-*', rh_trl.PRM, kind='next_token')."
)


class UnknownModelError(ValueError):
    """No registry entry and nothing in the model's files says which reward class fits the model."""


# ----------------------------------------------------------------------------------------------------------------
# Reading a model's files
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """What :func:`load` read about a model: its config, the files it looked at and the tokenizer's tokens.

    Attributes:
        source: the path or hub id as given.
        hub_id: the hub id (as given, or from a hub-cache path), if known.
        directory: the local directory read (a model directory, or the cached snapshot of a hub id).
        config: ``config.json`` as a dict.
        files: names of the files in ``directory``.
        tokens: added and special tokens declared by the tokenizer files (or the tokenizer object).
    """

    source: str
    hub_id: str | None
    directory: Path | None
    config: dict[str, Any]
    files: tuple[str, ...] = ()
    tokens: frozenset[str] = frozenset()

    def describe(self) -> str:
        """The config facts used to decide, for error messages."""
        c = self.config
        parts = [
            f"architectures {c.get('architectures') or []}",
            f"model_type {c.get('model_type')!r}",
        ]
        classifier = any(str(a).endswith("Classification") for a in c.get("architectures") or [])
        if classifier and ("num_labels" in c or "id2label" in c):
            parts.append(f"num_labels {c.get('num_labels', len(c.get('id2label') or {}))}")
        if c.get("auto_map"):
            parts.append(f"auto_map {sorted(c['auto_map'])}")
        if self.files:
            shown = sorted(self.files)
            more = f" (+{len(shown) - 12} more)" if len(shown) > 12 else ""
            parts.append(f"files {shown[:12]}{more}")
        parts.append(
            f"tokenizer {'declares' if SEPARATOR_TOKEN in self.tokens else 'has no'} {SEPARATOR_TOKEN!r} token"
        )
        return ", ".join(parts)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _tokens_in(values: Iterable[Any]) -> set[str]:
    return {t for t in (_token_text(v) for v in values) if t is not None}


def tokenizer_file_tokens(directory: Path) -> frozenset[str]:
    """Added and special tokens declared by the tokenizer files in ``directory`` (none of its code is run)."""
    found: set[str] = set()
    data = _read_json(directory / "tokenizer.json")
    if isinstance(data, Mapping):
        found |= _tokens_in(data.get("added_tokens") or [])
    data = _read_json(directory / "tokenizer_config.json")
    if isinstance(data, Mapping):
        found |= _tokens_in((data.get("added_tokens_decoder") or {}).values())
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = data.get(key) or []
            found |= _tokens_in(value.values() if isinstance(value, Mapping) else value)
        found |= _tokens_in(data.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    data = _read_json(directory / "special_tokens_map.json")
    if isinstance(data, Mapping):
        for value in data.values():
            found |= _tokens_in(value if isinstance(value, list) else [value])
    data = _read_json(directory / "added_tokens.json")
    if isinstance(data, Mapping):
        found |= {str(k) for k in data}
    return frozenset(found)


def _object_tokens(tokenizer: Any) -> frozenset[str]:
    tokens: set[str] = set()
    if hasattr(tokenizer, "get_added_vocab"):
        tokens |= set(tokenizer.get_added_vocab())
    tokens |= set(getattr(tokenizer, "all_special_tokens", None) or [])
    return frozenset(tokens)


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename))


def _hub_error(repo_id: str, err: Exception) -> ModelLoadError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = repo_id.rsplit("/", 1)[-1]
    local = (
        f"pass the path of a local copy instead (e.g. `hf download {repo_id} --local-dir {name}` on a machine "
        f"with network, then rh_trl.load('{name}'): a copy that keeps the name is matched by the registry too)"
    )
    if isinstance(err, GatedRepoError):
        return ModelLoadError(
            f"'{repo_id}' is a gated model on the hub: accept its terms and log in, or {local}"
        )
    if isinstance(err, RepositoryNotFoundError):
        return ModelLoadError(
            f"'{repo_id}' is neither a local directory nor a model on the hub (a private repository needs a "
            "login); check the spelling, or pass a local model directory"
        )
    if is_offline() or isinstance(err, LocalEntryNotFoundError):
        mode = (
            "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and it is not in the local hub cache"
            if is_offline()
            else "the hub could not be reached and it is not in the local hub cache"
        )
        return ModelLoadError(
            f"'{repo_id}' is not a local directory, so it was looked up as a hub id, but {mode}; {local}"
        )
    return ModelLoadError(f"could not read '{repo_id}' from the hub ({type(err).__name__}: {err}); {local}")


def inspect_model(source: str | os.PathLike, tokenizer: Any = None) -> ModelFiles:
    """Read a model's config and tokenizer tokens from a local directory or a hub id (only small files, no code).

    Raises :class:`~rh_trl.ModelLoadError` for a path that is not a model directory, or a hub id that cannot be
    read (offline and not cached, unknown, gated).
    """
    text = os.fspath(source)
    check_model_source(text)  # a directory without config.json, a file, a path that does not exist
    local = Path(text).expanduser()
    if local.is_dir():
        directory, hub_id = local, hub_id_from_path(local)
    else:
        try:
            directory, hub_id = _hub_file(text, CONFIG_FILE).parent, text
        except Exception as err:
            raise _hub_error(text, err) from err
        for name in TOKENIZER_FILES:
            try:
                _hub_file(text, name)
            except Exception:  # optional files: many repositories have only some of them
                continue
    config = _read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{directory / CONFIG_FILE} is not a JSON object; expected a model config")
    if isinstance(tokenizer, str | os.PathLike) and Path(tokenizer).expanduser().is_dir():
        tokens = tokenizer_file_tokens(Path(tokenizer).expanduser())
    elif tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        tokens = _object_tokens(tokenizer)
    else:
        tokens = tokenizer_file_tokens(directory)
    files = tuple(sorted(p.name for p in directory.iterdir()))
    return ModelFiles(text, hub_id, directory, config, files, tokens)


# ----------------------------------------------------------------------------------------------------------------
# Deciding
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """What :func:`load` will build: ``target(model, **options)``, or ``target(**options)`` when ``model`` is
    ``None`` (DrSow takes ``strong=``/``weak=``).

    ``family`` is a short label (``"orm"``, ``"prm:next_token"``, …), ``reason`` says what decided it.
    """

    target: Callable[..., Reward]
    options: dict[str, Any]
    family: str
    reason: str
    model: Any = None


def _family_label(target: Any, options: Mapping[str, Any]) -> str:
    if _is_class(target, PRM):
        return f"prm:{options.get('kind', 'separator')}"
    for name, cls in FAMILIES.items():
        if _is_class(target, cls):  # type: ignore[arg-type]
            return name
    return getattr(target, "__name__", type(target).__name__)


def _is_class(target: Any, cls: type) -> bool:
    return isinstance(target, type) and issubclass(target, cls)


def infer_from_config(
    files: ModelFiles, options: Mapping[str, Any]
) -> tuple[Callable[..., Reward], dict[str, Any], str]:
    """The class and options that a model's config and tokenizer tokens call for (see the module docstring).

    Raises :class:`UnknownModelError` when they do not decide.
    """
    config = files.config
    archs = [str(a) for a in config.get("architectures") or []]
    where = f"config.json: architectures {archs}"
    if config.get("model_type") == CLoudConfig.model_type or "CLoudModel" in archs:
        return CLoud, {}, f"config.json: model_type {config.get('model_type')!r} (a saved CLoudModel)"
    if "CLoudRewardModel" in archs:
        raise UnknownModelError(f"'{files.source}' cannot be loaded: {UPSTREAM_CLOUD}.")
    for arch in archs:
        if arch in ORM_ADAPTERS:
            adapter = ORM_ADAPTERS[arch]
            extra = {"trust_remote_code": True} if adapter.trust_remote_code else {}
            return ORM, extra, f"{where} (ORM adapter '{adapter.name}')"
    if any(a.endswith("ForProcessRewardModel") for a in archs):
        return PRM, {"kind": "separator"}, where
    if any(a.endswith("ForTokenClassification") for a in archs):
        num_labels = int(config.get("num_labels", len(config.get("id2label") or {}) or 2))
        if num_labels == 2 and (SEPARATOR_TOKEN in files.tokens or options.get("step_token")):
            return PRM, {"kind": "separator"}, f"{where}, 2 labels, step token in the tokenizer"
        raise UnknownModelError(
            f"'{files.source}' is a token-classification model ({files.describe()}); rh_trl reads such a model as a "
            f"separator PRM when it has 2 labels and a step token ({SEPARATOR_TOKEN!r}, or pass step_token='…'). "
            + _HAND_PICK
        )
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return ORM, {}, where
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    what = (
        "a causal LM, and a causal LM's files do not say what it was trained for (a next-token PRM, a step-tag "
        "PRM, a pairwise preference model and a policy look alike), and no registry pattern matches it"
        if causal
        else "a model whose config names no architecture rh_trl knows, and no registry pattern matches it"
    )
    raise UnknownModelError(f"cannot tell which reward '{files.source}' is: it is {what}. Looked at: "
                            f"{files.describe()}. {_HAND_PICK}")  # fmt: skip


def _entry_target(entry: ModelEntry) -> Callable[..., Reward]:
    if entry.target is None:
        raise UnknownModelError(f"rh_trl does not load '{entry.pattern}'")
    if isinstance(entry.target, str):
        return import_target(entry.target, f"the reward registered for '{entry.pattern}'")
    return entry.target


def _entry_for_source(source: str) -> tuple[ModelEntry | None, bool]:
    """The registry row for a path or hub id, and whether it was matched by hub id (``False``: by name only)."""
    local = Path(source).expanduser()
    if local.is_dir():
        hub_id = hub_id_from_path(local)
        if hub_id is not None:
            return lookup(hub_id), True
        return lookup(directory_name=local.resolve().name), False
    return (None, True) if local.exists() else (lookup(source), True)


def _loaded_model_files(model: Any, tokenizer: Any) -> ModelFiles:
    config = dict(config_dict(model))
    config["architectures"] = [type(model).__name__]  # the class it was loaded as (a fresh config has none)
    tokens = _object_tokens(tokenizer) if tokenizer is not None else frozenset()
    label = str(getattr(model, "name_or_path", "") or type(model).__name__)
    return ModelFiles(label, None, None, config, (), tokens)


def resolve(model: Any, *, family: str | None = None, **options: Any) -> Resolution:
    """Decide which class :func:`load` builds for ``model`` and with which options, without loading weights
    (a tiny ``"rh_trl:…"`` model is built here).

    Raises :class:`UnknownModelError`, or :class:`~rh_trl.ModelLoadError` when the model's files cannot be read.
    """
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    if _is_server(model) and family != "drsow":
        source = options.get("tokenizer")
        if not isinstance(source, str | os.PathLike):
            raise ValueError(
                f"{model!r} is a server, so the reward class is chosen from the model's files: pass "
                "tokenizer=<the model's directory or hub id> (it is also what rh_trl tokenizes with)"
            )
        found = resolve(source, family=family, **options)
        return replace(
            found, model=model, reason=f"{found.reason}, read from tokenizer={os.fspath(source)!r}"
        )
    if family == "drsow" or (isinstance(model, str) and model.casefold() == "drsow"):
        missing = [k for k in ("strong", "weak") if options.get(k) is None]
        if missing:
            raise ValueError(
                f"load('drsow') needs strong=… and weak=… (two causal LMs: paths, hub ids, or server URLs with "
                f"engine='openai'); missing: {missing}"
            )
        return Resolution(DrSow, resolve_tiny(options), "drsow", "the name 'drsow'")

    saved_embedding_rm = isinstance(model, str | os.PathLike) and os.path.isfile(
        os.path.join(model, EMBEDDING_CONFIG)
    )
    if family in (None, "embedding") and saved_embedding_rm:
        return Resolution(
            load_embedding_rm, options, "embedding", f"{EMBEDDING_CONFIG} in the directory", model
        )

    if isinstance(model, str) and model.startswith(TINY_PREFIX):
        options = resolve_tiny({**options, "model": model})
        model = options.pop("model")
    entry, by_id = None, True
    if isinstance(model, str | os.PathLike):
        source = os.fspath(model)
        if family is None:
            entry, by_id = _entry_for_source(source)
        if entry is not None and entry.unsupported and by_id:
            raise UnknownModelError(f"rh_trl does not load '{source}': {entry.unsupported}.")
        files = inspect_model(source, options.get("tokenizer"))
    else:
        files = _loaded_model_files(model, options.get("tokenizer"))

    if family is not None:
        target, base, reason = FAMILIES[family], {}, f"family={family!r}"
    elif entry is not None and by_id:
        target, base, reason = (
            _entry_target(entry),
            dict(entry.options),
            f"registry pattern '{entry.pattern}'",
        )
    else:
        try:
            target, base, reason = infer_from_config(files, options)
        except UnknownModelError:
            if entry is None:
                raise
            # a directory name is weaker evidence than the config: it decides only what the config leaves open
            if entry.unsupported:
                raise UnknownModelError(
                    f"rh_trl does not load '{files.source}': {entry.unsupported}."
                ) from None
            target, base = _entry_target(entry), dict(entry.options)
            reason = f"directory name matches registry pattern '{entry.pattern}'"
    merged = {**base, **options}
    return Resolution(target, merged, _family_label(target, merged), reason, model)


# ----------------------------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------------------------


def _is_server(model: Any) -> bool:
    """A base URL, or a list of them (replicas of a served model)."""
    urls = [model] if isinstance(model, str) else model if isinstance(model, list | tuple) else []
    return bool(urls) and all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls)


def _accepts(target: Any, name: str) -> bool:
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def supported_engines(target: Any, options: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The engines a reward class runs on (``None``: it takes ``engine=`` and checks the value itself)."""
    if _is_class(target, ORM):
        return ENGINES if options.get("adapter") in (None, DEFAULT_ADAPTER.name) else ("hf",)
    if any(_is_class(target, cls) for cls in (PRM, DrSow, CLoud, PairwisePM)):
        return ENGINES
    return None if _accepts(target, "engine") else ("hf",)


_ENGINE_HINTS = {
    "orm": "its adapter runs the checkpoint's own code (a reward head that is not a sequence-classification "
    "layer), which vLLM's model registry does not have; to score it from another machine, host it with "
    "`rh-trl serve` and call it with rh_trl.RemoteRM",
}


def check_engine(resolution: Resolution, engine: str) -> None:
    """Raise a ValueError naming the supported engines when ``resolution``'s class does not run on ``engine``."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {list(ENGINES)}")
    engines = supported_engines(resolution.target, resolution.options)
    if engines is not None and engine not in engines:
        name = getattr(resolution.target, "__name__", "the reward")
        label = name if name == resolution.family else f"{name} ({resolution.family})"
        hint = _ENGINE_HINTS.get(resolution.family.split(":")[0], "")
        raise ValueError(
            f"{label} does not run on engine={engine!r}; engines it supports: {list(engines)}"
            + (f" ({hint})" if hint else "")
        )


# ----------------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------------


def load(model: Any, engine: str = "hf", *, family: str | None = None, **options: Any) -> Reward:
    """The reward for a model: the right rh_trl class, chosen from the registry or the model's files.

    Args:
        model: a hub id, a local model directory, a loaded transformers model (pass ``tokenizer=`` too), a tiny
            offline model (``"rh_trl:tiny-rm"``), or ``"drsow"`` (with ``strong=`` and ``weak=``).
        engine: ``"hf"`` (local transformers), ``"vllm"`` (in-process vLLM) or ``"openai"`` (OpenAI-compatible
            servers); passed to the class when it takes an ``engine`` argument.
        family: pick the class by hand: ``"orm"``, ``"prm"``, ``"pairwise"``, ``"cloud"`` or ``"drsow"``.
        **options: keyword arguments of the class (they override the registry's).

    Raises:
        UnknownModelError: nothing says which class fits (the message lists what was read and how to choose).
        ModelLoadError: the path is not a model directory, or a hub id cannot be read (e.g. offline).
        ValueError: the class does not run on ``engine`` (the message lists the engines it supports), or it takes
            no option of that name (the message names the closest one).
    """
    resolution = resolve(model, family=family, **options)
    check_engine(resolution, engine)
    kwargs = dict(resolution.options)
    if _accepts(resolution.target, "engine"):
        kwargs["engine"] = engine
    check_options(resolution.target, kwargs)
    args = () if resolution.model is None else (resolution.model,)
    logger.debug(
        "rh_trl.load: %s -> %s (%s; %s)",
        model if isinstance(model, str | os.PathLike) else type(model).__name__,
        getattr(resolution.target, "__name__", resolution.target),
        resolution.family,
        resolution.reason,
    )
    return resolution.target(*args, **kwargs)
