"""GGUF checkpoints as plain Hugging Face folders: converted once into the user cache, verified by digest.

transformers reads a GGUF file (with the ``gguf`` package) and dequantizes its weights, but the model it
builds carries a GGUF quantizer that refuses ``save_pretrained``, and every load dequantizes again (about
13 s for SmolLM2-135M). :func:`converted_checkpoint` does that once: it writes the dequantized float32
weights (``model.safetensors``), the configuration without its quantization entry (``config.json``) and the
tokenizer files into ``<cache>/<name>-<digest>/``, with ``pfedlora-conversion.json`` naming the GGUF's
SHA-256 and the SHA-256 of every file written. Every later use checks each file against that note (once
per process) and converts again where one differs. The weights are those of the quantized model,
dequantized: not the original checkpoint's.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

from pfedlora.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_CACHE: Path = platformdirs.user_cache_path("pfedlora") / "models"
"""Where converted GGUF checkpoints go (read at call time, so tests can point it elsewhere)."""
CONVERSION_NOTE = "pfedlora-conversion.json"
LLM_EXTRA = "pip install 'pfedlora[llm]'"


def _digest(path: Path) -> str:
    from pfedlora.simulation.results import file_digest  # the one digest of run files, models and data

    return file_digest(path)


def converted_checkpoint(gguf_file: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder holding the model of ``gguf_file``, converted into :data:`GGUF_CACHE` the
    first time (ConfigError, one line, where the file is missing, the ``gguf`` package is not installed,
    or transformers cannot read the file)."""
    path = Path(gguf_file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"GGUF checkpoint {str(path)!r}: no such file")
    return _converted(path, path.stat().st_size, path.stat().st_mtime_ns, GGUF_CACHE)


@functools.lru_cache(maxsize=8)
def _converted(path: Path, size: int, mtime_ns: int, cache: Path) -> Path:
    """:func:`converted_checkpoint`, once per process per file version (size and time in the key)."""
    source_digest = _digest(path)
    folder = cache / f"{path.stem}-{source_digest[:16]}"
    note = folder / CONVERSION_NOTE
    if note.is_file():
        problem = _damage(folder)
        if problem is None:
            return folder
        logger.warning("%s: %s; converting %s again", folder, problem, path.name)
    return _convert(path, source_digest, folder)


def _damage(folder: Path) -> str | None:
    """What is wrong with a converted folder (a file missing or differing from the note), or None."""
    try:
        files: dict[str, str] = json.loads((folder / CONVERSION_NOTE).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CONVERSION_NOTE} is unreadable"
    for name, expected in files.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if _digest(folder / name) != expected:
            return f"{name} differs from the SHA-256 it was written with"
    return None


def _transformers() -> Any:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading a GGUF checkpoint needs the `gguf` package: {LLM_EXTRA}")
    from pfedlora.models.transformer import require_transformers

    return require_transformers()


def _convert(path: Path, source_digest: str, folder: Path) -> Path:
    """Dequantize ``path`` into ``folder`` (written in a scratch folder beside it, then renamed)."""
    transformers = _transformers()
    from safetensors.torch import save_file

    logger.warning("converting %s into %s (once)", path.name, folder)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as error:  # transformers raises ValueError, KeyError, OSError, RuntimeError alike
        raise ConfigError(f"{path}: not a GGUF model transformers can read ({error})") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".converting-") as scratch:
        target = Path(scratch) / "model"
        target.mkdir()
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        state = {
            key: value.detach().contiguous()
            for key, value in model.state_dict().items()
            if not (tied and key == "lm_head.weight")  # the same tensor as the input embeddings
        }
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        files = {p.name: _digest(p) for p in sorted(target.iterdir()) if p.is_file()}
        note = {
            "source": path.name,
            "source_sha256": source_digest,
            "files": files,
            "note": "weights dequantized from the GGUF file's quantized values, not the original checkpoint",
        }
        (target / CONVERSION_NOTE).write_text(json.dumps(note, indent=1) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a damaged conversion: ours replaces it
        try:
            os.replace(target, folder)
        except OSError:
            if _damage(folder) is not None:  # not another process's complete conversion either
                raise
    return folder
