"""Model presets, the model folder, and the device: what pretraining, embedding and perturbation share.

A *model folder* is a standard HuggingFace checkpoint that ``BertForMaskedLM.from_pretrained`` opens,
plus what a corpus user needs beside it::

    config.json, model.safetensors     save_pretrained output
    token_dictionary.pkl               the vocabulary the model was trained on (a copy of the corpus's)
    genecorpus_model.json              preset, layout, corpus, training summary (optional)
    loss_curve.png                     written by ``genecorpus pretrain`` (optional)

A Geneformer checkpoint folder (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``, no
dictionary) is opened too, with its token dictionary given separately (gc30M or gc104M layout).

Needs the ``train`` extra (``pip install 'genecorpus[train]'``: torch and transformers).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genecorpus.corpus.folder import TOKEN_DICTIONARY as CORPUS_TOKEN_DICTIONARY
from genecorpus.errors import ConfigError, InputError
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    import torch
    from transformers import BertConfig, BertForMaskedLM

__all__ = [
    "PRESETS", "ModelPreset", "adamw", "bert_config", "default_permissions", "load_model", "pick_device",
    "quiet_transformers", "require_torch", "save_model", "uses_bf16",
]

MODEL_INFO = "genecorpus_model.json"
"""The model folder's record of its preset, layout, corpus and training."""
TOKEN_DICTIONARY = CORPUS_TOKEN_DICTIONARY
"""The model folder's copy of its corpus's token dictionary, under the corpus folder's file name."""


@dataclass(frozen=True)
class ModelPreset:
    """Size of a ``BertForMaskedLM``."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    activation: str = "relu"
    dropout: float = 0.02


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(layers=2, hidden=64, heads=2, intermediate=128),
    "small": ModelPreset(layers=4, hidden=128, heads=4, intermediate=256),
    # Geneformer V1 (SPEC §2.9): 6 layers, hidden 256, 4 heads, intermediate 512, ReLU, dropout 0.02
    "gf-6l": ModelPreset(layers=6, hidden=256, heads=4, intermediate=512),
}
"""``tiny`` for tests (seconds on a CPU), ``small`` for CPU runs of minutes, ``gf-6l`` as Geneformer V1."""


def require_torch() -> None:
    """Raise a one-line error if the ``train`` extra is not installed."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        msg = "this command needs torch and transformers: pip install 'genecorpus[train]'"
        raise ConfigError(msg) from None


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and warnings (the commands show their own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def bert_config(preset: str | ModelPreset, token_dictionary: TokenDictionary, *,
                max_positions: int) -> BertConfig:
    """The ``BertConfig`` of a preset for a vocabulary (vocab size = largest token id + 1).

    Parameters
    ----------
    preset
        A name in :data:`PRESETS` or a :class:`ModelPreset`.
    token_dictionary
        The corpus's dictionary; ``<pad>`` becomes ``pad_token_id``.
    max_positions
        Position embeddings: at least the longest cell the model will see (2,048 for gc30m, 4,096 for
        gc104m).
    """
    from transformers import BertConfig

    if isinstance(preset, str):
        if preset not in PRESETS:
            msg = f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}"
            raise ConfigError(msg)
        preset = PRESETS[preset]
    return BertConfig(
        vocab_size=token_dictionary.max_token + 1,
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        intermediate_size=preset.intermediate,
        hidden_act=preset.activation,
        hidden_dropout_prob=preset.dropout,
        attention_probs_dropout_prob=preset.dropout,
        max_position_embeddings=max_positions,
        pad_token_id=token_dictionary.special["<pad>"],
        type_vocab_size=1,
    )


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``…), else CUDA when available, else CPU."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            msg = f"--device {device}: no CUDA device here; use --device cpu or leave it out"
            raise ConfigError(msg)
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def uses_bf16(device: torch.device) -> bool:
    """Whether training on ``device`` runs under bf16 autocast: on CUDA devices that support it, never on CPU."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable weights of ``model``; biases and LayerNorm weights without weight decay."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def save_model(model: BertForMaskedLM, folder: str | os.PathLike[str], token_dictionary: TokenDictionary,
               info: dict[str, Any] | None = None) -> Path:
    """Write a model folder (see the module docstring); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    default_permissions(folder)
    token_dictionary.save(folder / TOKEN_DICTIONARY)
    if info is not None:
        (folder / MODEL_INFO).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return folder


def default_permissions(folder: Path) -> None:
    """Give the files of ``folder`` the permissions of a new file under the user's umask.

    safetensors writes ``model.safetensors`` private (0600); a model folder is shared like any output.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, ModelPreset):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def load_model(folder: str | os.PathLike[str], *, token_dictionary: str | os.PathLike[str] | None = None,
               device: str | torch.device | None = None) -> tuple[BertForMaskedLM, TokenDictionary]:
    """Open a model folder (ours or Geneformer's) in eval mode on ``device``.

    Parameters
    ----------
    folder
        A folder with ``config.json`` and weights.
    token_dictionary
        The vocabulary, if the folder has no ``token_dictionary.pkl`` (Geneformer checkpoints).
    device
        Default: :func:`pick_device`.

    Raises
    ------
    InputError
        Not a model folder, no dictionary, or a dictionary that does not fit the model's vocabulary.
    """
    require_torch()
    from transformers import BertForMaskedLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        msg = f"{folder}: not a model folder (no config.json); give the folder genecorpus pretrain wrote"
        raise InputError(msg)
    tdict_path = Path(token_dictionary) if token_dictionary else folder / TOKEN_DICTIONARY
    if not tdict_path.is_file():
        msg = (f"{folder}: has no {TOKEN_DICTIONARY}; pass the model's token dictionary "
               "(e.g. --token-dictionary token_dictionary_gc30M.pkl for Geneformer V1)")
        raise InputError(msg)
    tdict = TokenDictionary.load(tdict_path)
    try:
        model = BertForMaskedLM.from_pretrained(folder)
    except (OSError, ValueError) as e:
        msg = f"{folder}: cannot load the model ({str(e).splitlines()[0]}); check the folder's weights"
        raise InputError(msg) from None
    if tdict.max_token >= model.config.vocab_size:
        msg = (f"{tdict_path}: token ids up to {tdict.max_token} but the model has {model.config.vocab_size} "
               "embeddings; give the dictionary the model was trained with")
        raise InputError(msg)
    model.to(pick_device(str(device)) if device is not None else pick_device())
    model.eval()
    return model, tdict


def model_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's ``genecorpus_model.json``, or an empty dict (e.g. a Geneformer checkpoint)."""
    path = Path(folder) / MODEL_INFO
    return json.loads(path.read_text()) if path.is_file() else {}
