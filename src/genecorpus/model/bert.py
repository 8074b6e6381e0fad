"""Model presets, the model folder, and the device: what pretraining, embedding and perturbation share.

A *model folder* is a standard HuggingFace checkpoint that ``BertForMaskedLM.from_pretrained`` opens,
plus what a corpus user needs beside it::

    config.json, model.safetensors     save_pretrained output
    token_dictionary.pkl               the vocabulary the model was trained on (a copy of the corpus's)
    genecorpus_model.json              preset, layout, corpus, training summary (optional)
    README.md                          the model card, generated from genecorpus_model.json (see
                                       :mod:`genecorpus.model.card`)
    loss_curve.png                     written by ``genecorpus pretrain`` (optional)

A Geneformer checkpoint folder (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``, no
dictionary) is opened too, with its token dictionary given separately (gc30M or gc104M layout).

Every model built or loaded here computes attention with PyTorch's scaled-dot-product attention
(``attn_implementation="sdpa"``, :data:`ATTENTION`; transformers 5 picks it for Bert by default too, we make
it explicit and record it). SDPA cannot return attention weights: code that needs them loads the model
with ``attention="eager"`` (nothing in genecorpus does today). :func:`autocast` is the one place that decides
the arithmetic of the forward passes (``precision``: ``auto``, ``fp32`` or ``bf16``) for pretraining,
embedding and fine-tuning alike, on CPUs and GPUs.

Needs the ``train`` extra (``pip install 'genecorpus[train]'``: torch and transformers).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from genecorpus.corpus.folder import TOKEN_DICTIONARY as CORPUS_TOKEN_DICTIONARY
from genecorpus.errors import ConfigError, InputError
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    import torch
    from transformers import BertConfig, BertForMaskedLM

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION", "PRECISIONS", "PRESETS", "ModelPreset", "adamw", "autocast", "bert_config", "default_permissions",
    "load_model", "model_token_dictionary", "pick_device", "quiet_transformers", "require_torch", "resolve_precision",
    "save_model",
]

MODEL_INFO = "genecorpus_model.json"
"""The model folder's record of its preset, layout, corpus and training."""
TOKEN_DICTIONARY = CORPUS_TOKEN_DICTIONARY
"""The model folder's copy of its corpus's token dictionary, under the corpus folder's file name."""
ATTENTION = "sdpa"
"""The attention implementation of every model built or loaded here:
``torch.nn.functional.scaled_dot_product_attention`` (a fused kernel: flash or memory-efficient attention on
GPUs). ``"eager"`` (the explicit softmax(QKᵀ)V) only where attention weights are needed."""
Attention = Literal["sdpa", "eager"]
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
"""``auto``: bf16 autocast on a CUDA device that supports it, else fp32; ``fp32``: no autocast; ``bf16``:
bf16 autocast on any device (a CPU too: slower there, but the same code path as on a GPU)."""


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
        attn_implementation=ATTENTION,
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


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """The arithmetic a ``precision`` choice means on ``device`` (``auto``: bf16 on CUDA with bf16, else fp32).

    Raises
    ------
    ConfigError
        An unknown choice, or ``bf16`` on a CUDA device without bf16 support.
    """
    import torch

    if precision not in PRECISIONS:
        msg = f"--precision {precision!r}: unknown; use one of {', '.join(PRECISIONS)}"
        raise ConfigError(msg)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if precision == "bf16" and device.type == "cuda" and not cuda_bf16:
        msg = f"--precision bf16: {device} does not support bfloat16; use --precision fp32 (or auto)"
        raise ConfigError(msg)
    return "bf16" if precision == "bf16" else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager[None]:
    """The autocast context of a forward pass: bf16 matmuls (weights and reductions stay fp32) or none.

    Pretraining, embedding and fine-tuning all run their forward passes inside it, so the CUDA path and
    the CPU path differ only in the device. Outputs may be bf16 under it: cast what you keep (``.float()``).

    Parameters
    ----------
    device
        Where the model is.
    precision
        ``auto``, ``fp32`` or ``bf16`` (see :data:`PRECISIONS` and :func:`resolve_precision`).
    """
    import torch

    resolved = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolved == "bf16")


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
               info: dict[str, Any] | None = None, *, name: str | None = None) -> Path:
    """Write a model folder (see the module docstring); returns its path.

    With ``info``, also ``genecorpus_model.json`` (``info`` plus the model's ``attention`` implementation and
    ``n_parameters``) and the model
    card ``README.md`` generated from it (:func:`genecorpus.model.card.write_model_card`), titled ``name``
    (default: the folder's name; give it when writing to a temporary folder that is renamed after).
    """
    from genecorpus.model.card import write_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    token_dictionary.save(folder / TOKEN_DICTIONARY)
    if info is not None:
        info = {**info, "attention": str(model.config._attn_implementation),
                "n_parameters": sum(p.numel() for p in model.parameters())}
        info = json.loads(json.dumps(info, default=_json_default))  # what the file holds, for the card
        (folder / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            write_model_card(folder, info, name=name)
        except InputError as e:  # the model is worth keeping without its card: say how to write it later
            logger.warning("model card not written (%s); `genecorpus card %s` writes it once the info is complete",
                           e, name or folder.name)
    default_permissions(folder)
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
               device: str | torch.device | None = None,
               attention: Attention = ATTENTION) -> tuple[BertForMaskedLM, TokenDictionary]:
    """Open a model folder (ours or Geneformer's) in eval mode on ``device``.

    Parameters
    ----------
    folder
        A folder with ``config.json`` and weights.
    token_dictionary
        The vocabulary, if the folder has no ``token_dictionary.pkl`` (Geneformer checkpoints).
    device
        Default: :func:`pick_device`.
    attention
        ``"sdpa"`` (default, :data:`ATTENTION`) or ``"eager"`` for code that needs attention weights
        (``output_attentions=True``, which SDPA cannot return).

    Raises
    ------
    InputError
        Not a model folder, no dictionary, or a dictionary that does not fit the model's vocabulary.
    """
    require_torch()
    from transformers import BertForMaskedLM

    folder = Path(folder)
    tdict, tdict_path = model_token_dictionary(folder, token_dictionary)
    try:
        model = BertForMaskedLM.from_pretrained(folder, attn_implementation=attention)
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


def model_token_dictionary(folder: str | os.PathLike[str], token_dictionary: str | os.PathLike[str] | None = None,
                           ) -> tuple[TokenDictionary, Path]:
    """The vocabulary of a model folder (its ``token_dictionary.pkl``, or ``token_dictionary`` when given, as
    for a Geneformer checkpoint) and where it was read from.

    Raises
    ------
    InputError
        ``folder`` has no ``config.json``, or no dictionary is there and none was given.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        msg = (f"{folder}: not a model folder (no config.json); give a folder genecorpus pretrain or finetune "
               "wrote, or a Geneformer checkpoint")
        raise InputError(msg)
    path = Path(token_dictionary) if token_dictionary else folder / TOKEN_DICTIONARY
    if not path.is_file():
        msg = (f"{folder}: has no {TOKEN_DICTIONARY}; pass the model's token dictionary "
               "(e.g. --token-dictionary token_dictionary_gc30M.pkl for Geneformer V1)")
        raise InputError(msg)
    return TokenDictionary.load(path), path


def model_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The folder's ``genecorpus_model.json``, or an empty dict (e.g. a Geneformer checkpoint)."""
    path = Path(folder) / MODEL_INFO
    return json.loads(path.read_text()) if path.is_file() else {}
