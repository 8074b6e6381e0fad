"""Token and median dictionaries: Geneformer-compatible layouts, safe loading, saving.

Geneformer ships its dictionaries as pickles. Unpickling runs code, so :func:`load_pickled_dict` uses a
restricted unpickler that only builds plain dicts of str keys and str/int/float values (numpy scalars
included, which Geneformer's files contain); anything else is refused with a :class:`DictionaryError`.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from genecorpus.errors import DictionaryError

if TYPE_CHECKING:
    import os

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "SPECIAL_TOKENS",
    "Layout",
    "TokenDictionary",
    "load_gene_medians",
    "load_pickled_dict",
    "unpickle_restricted",
    "write_gene_medians",
]

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")

LayoutName = Literal["gc30m", "gc104m"]


@dataclass(frozen=True)
class Layout:
    """How a rank value encoding becomes ``input_ids`` (SPEC §2.7)."""

    name: LayoutName
    max_genes: int
    """Genes kept per cell after ranking."""
    special_tokens: tuple[str, ...]
    """Special tokens at the start of the token dictionary, in id order."""
    wrap_cls_eos: bool
    """Whether ``<cls>`` is prepended and ``<eos>`` appended to every cell."""


LAYOUTS: dict[str, Layout] = {
    "gc30m": Layout("gc30m", 2048, ("<pad>", "<mask>"), wrap_cls_eos=False),
    "gc104m": Layout("gc104m", 4094, ("<pad>", "<mask>", "<cls>", "<eos>"), wrap_cls_eos=True),
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("numpy.dtype", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):  # noqa: S301 - the restricted unpickler itself
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        msg = f"refuses to load {module}.{name}"
        raise pickle.UnpicklingError(msg)


def unpickle_restricted(data: bytes) -> Any:
    """Unpickle ``data`` allowing no class but NumPy scalars: the only way genecorpus reads pickles it did
    not write itself in this process (dictionaries, lengths files).

    Raises
    ------
    pickle.UnpicklingError
        The pickle refers to any other class or function.
    """
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def load_pickled_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a dictionary pickle (Geneformer's format) without running arbitrary code.

    Returns a dict whose values are converted to plain Python ``int``/``float``/``str``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        msg = f"{path}: cannot read dictionary ({e.strerror}); check the path"
        raise DictionaryError(msg) from None
    try:
        obj = unpickle_restricted(raw)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a plain dict pickle"
        msg = f"{path}: not a plain dictionary pickle ({e}); give a Geneformer *.pkl dictionary"
        raise DictionaryError(msg) from None
    if not isinstance(obj, dict):
        msg = f"{path}: holds a {type(obj).__name__}, not a dict; give a Geneformer *.pkl dictionary"
        raise DictionaryError(msg)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            msg = f"{path}: key {key!r} is not a string; give a Geneformer *.pkl dictionary"
            raise DictionaryError(msg)
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            msg = f"{path}: value of {key!r} is a {type(value).__name__}; expected str, int or float"
            raise DictionaryError(msg)
        out[key] = value
    return out


@dataclass(frozen=True)
class TokenDictionary:
    """A token dictionary: special tokens and genes (Ensembl IDs) with their integer ids.

    Attributes
    ----------
    gene_ids
        Ensembl IDs of the gene tokens, ordered by ascending token id (object array of str).
    gene_tokens
        Token id of each gene (int32), ascending.
    special
        Special token name → id (``<pad>``, ``<mask>``, optionally ``<cls>``, ``<eos>``).
    """

    gene_ids: np.ndarray
    gene_tokens: np.ndarray
    special: dict[str, int]

    @classmethod
    def from_genes(cls, ensembl_ids: np.ndarray, layout: Layout) -> TokenDictionary:
        """Our own dictionary: special tokens of the layout first, then genes in ascending ID order."""
        genes = np.array(sorted(set(ensembl_ids.tolist())), dtype=object)
        first = len(layout.special_tokens)
        tokens = np.arange(first, first + len(genes), dtype=np.int32)
        return cls(genes, tokens, {t: i for i, t in enumerate(layout.special_tokens)})

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any], *, source: str = "token dictionary") -> TokenDictionary:
        """Build from a ``{token: id}`` dict such as Geneformer's ``token_dictionary*.pkl``."""
        for token, value in mapping.items():
            if not isinstance(value, int) or isinstance(value, bool):
                msg = (f"{source}: id of {token!r} is {value!r}, not an integer; "
                       "give a Geneformer token dictionary")
                raise DictionaryError(msg)
        special = {k: v for k, v in mapping.items() if k in SPECIAL_TOKENS}
        genes = [(v, k) for k, v in mapping.items() if k not in SPECIAL_TOKENS]
        for required in ("<pad>", "<mask>"):
            if required not in special:
                msg = f"{source}: has no {required} token; give a Geneformer token dictionary"
                raise DictionaryError(msg)
        owner: dict[int, str] = {}
        for token, value in mapping.items():
            if value < 0:
                msg = f"{source}: id of {token!r} is negative ({value}); the dictionary is corrupt"
                raise DictionaryError(msg)
            if value in owner:
                msg = (f"{source}: {owner[value]!r} and {token!r} share the id {value}; "
                       "the dictionary is corrupt")
                raise DictionaryError(msg)
            owner[value] = token
        genes.sort()
        gene_ids = np.array([g for _, g in genes], dtype=object)
        gene_tokens = np.array([v for v, _ in genes], dtype=np.int32)
        return cls(gene_ids, gene_tokens, special)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenDictionary:
        """Load a Geneformer-style ``token_dictionary*.pkl``."""
        return cls.from_mapping(load_pickled_dict(path), source=str(path))

    def to_mapping(self) -> dict[str, int]:
        """The Geneformer-compatible ``{token: id}`` dict (specials first, then genes)."""
        out = dict(sorted(self.special.items(), key=lambda kv: kv[1]))
        out.update(zip(self.gene_ids.tolist(), self.gene_tokens.tolist(), strict=True))
        return out

    def layout(self) -> Layout:
        """The layout this dictionary was made for: gc104m when it has ``<cls>``/``<eos>``."""
        return LAYOUTS["gc104m"] if "<cls>" in self.special and "<eos>" in self.special else LAYOUTS["gc30m"]

    @property
    def max_token(self) -> int:
        """Largest token id."""
        top = int(self.gene_tokens.max()) if len(self.gene_tokens) else 0
        return max([top, *self.special.values()])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the Geneformer-compatible pickle (plain dict str → int)."""
        with Path(path).open("wb") as fh:
            pickle.dump(self.to_mapping(), fh, protocol=4)


def load_gene_medians(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read gene medians from a Geneformer ``gene_median_dictionary*.pkl`` or our TSV.

    The TSV has a header line ``ensembl_id<TAB>median`` and one gene per line; values are float64
    written with ``repr`` so they round-trip exactly.
    """
    path = Path(path)
    if path.suffix == ".pkl":
        raw = load_pickled_dict(path)
        medians = {k: v for k, v in raw.items() if isinstance(v, int | float)}
        if len(medians) != len(raw):
            gene = next(k for k in raw if k not in medians)
            msg = (f"{path}: median of {gene} is {raw[gene]!r}, not a number; "
                   "give a gene_median_dictionary*.pkl")
            raise DictionaryError(msg)
    else:
        medians = {}
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            msg = f"{path}: cannot read gene medians ({reason}); give a .pkl or a genecorpus .tsv"
            raise DictionaryError(msg) from None
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split("\t")
            try:
                gene, value = parts[0], float(parts[1])
            except (IndexError, ValueError):
                msg = f"{path}: line {n} is not 'ensembl_id<TAB>median'; fix or regenerate the file"
                raise DictionaryError(msg) from None
            medians[gene] = value
    for gene, value in medians.items():
        if not (math.isfinite(value) and value > 0):
            msg = f"{path}: median of {gene} is {value}; medians must be positive and finite"
            raise DictionaryError(msg)
    return {k: float(v) for k, v in medians.items()}


def write_gene_medians(medians: dict[str, float], tsv: Path, pkl: Path) -> None:
    """Write medians as our TSV (exact ``repr`` floats) and a Geneformer-style pickle."""
    with tsv.open("w") as fh:
        fh.write("ensembl_id\tmedian\n")
        for gene, value in medians.items():
            fh.write(f"{gene}\t{value!r}\n")
    with pkl.open("wb") as fh:
        pickle.dump(dict(medians), fh, protocol=4)
