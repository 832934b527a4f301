"""Checkpoints: a directory of safetensors and JSON, nothing executable.

    checkpoint.json         format and version, model version id, backbone reference and layer
                            count, sizes, prompt templates, training config and best metrics,
                            sha256 of every file below
    embeddings.safetensors  collab_users, collab_items, content_users, content_items (float32), and the
                            item head's item_bias, logit_scale and head_projection (format 2; format 1
                            has none: bias 0, scale 1, identity, the paper's head), head_offsets and
                            head_readout when the head has them (--head-offsets, --head-readout), and the backbone's
                            low-rank adapters, adapter.<block>.<path>.down/up, when it has them
                            (checkpoint.json's "adapters": rank, blocks and targets)
    split.safetensors       the train/val/test split as (user, item, part) index arrays
    ids.json                user ids, item ids, item titles and texts (title and description; index order)
    metrics.jsonl           one line per training epoch (appended by the trainer; not checksummed)

checkpoint.json is written last, so a directory whose files do not match its checksums was
interrupted or damaged and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors import safe_open
from safetensors.torch import save_file as save_torch

from model.adapters import adapter_tensors, load_adapter_tensors
from model.backbone import load_backbone
from model.cllm4rec import CLLM4Rec
from model.data import Split
from model.prompts import PromptTemplates, TokenSpace

FORMAT = "cllm4rec-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "checkpoint.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
SPLIT_FILE = "split.safetensors"
IDS_FILE = "ids.json"
METRICS_FILE = "metrics.jsonl"
TABLES = ("collab_users", "collab_items", "content_users", "content_items")
SCORING_TABLES = ("collab_users", "collab_items")  # what scoring reads: the collaborative view
HEAD = ("item_bias", "logit_scale", "head_projection")
HEAD_OFFSETS = "head_offsets"  # only in checkpoints of a head with per-item offsets (--head-offsets)
HEAD_READOUT = "head_readout"  # only in checkpoints of a head that reads the readout states (--head-readout)


class CheckpointError(ValueError):
    """The checkpoint cannot be used; the message says what is wrong with it."""


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    user_ids: list[str]
    item_ids: list[str]
    item_titles: list[str]
    item_texts: list[str]  # title and description (model.data.item_text); the titles in checkpoints before them
    embeddings: dict[str, torch.Tensor]
    split: Split

    @property
    def model_version(self) -> str:
        return self.meta["model_version"]

    @property
    def templates(self) -> PromptTemplates:
        return PromptTemplates.from_dict(self.meta["templates"])


# --- writing ---------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replace_atomically(target: Path, write) -> None:
    """write(tmp_path) then rename over target: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; a checkpoint is read by other users (containers)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
    _replace_atomically(path, write)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _replace_atomically(path, lambda tmp: save_torch({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


def tables_of(model: CLLM4Rec) -> tuple[str, ...]:
    """The tables a model holds: all four, or the scoring ones of a model built without its content view."""
    return TABLES if model.content_view else SCORING_TABLES


def model_tensors(model: CLLM4Rec) -> dict[str, torch.Tensor]:
    """Everything a checkpoint keeps of the model: the four tables and the item head's parameters."""
    tensors = {name: getattr(model, name).weight.detach().float().cpu() for name in tables_of(model)}
    tensors.update({name: getattr(model, name).detach().float().cpu() for name in HEAD})
    if model.has_head_offsets:
        tensors[HEAD_OFFSETS] = model.head_offsets.detach().float().cpu()
    if model.has_head_readout:
        tensors[HEAD_READOUT] = model.head_readout.detach().float().cpu()
    tensors.update(adapter_tensors(model.adapters))
    return tensors


def load_model_tensors(model: CLLM4Rec, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of model_tensors; head parameters a format-1 checkpoint lacks keep the paper's head.

    The tables take the given tensors' storage (converted where device or dtype differ) rather than a
    copy: a table is the memory per user, and a copy would hold it twice while loading."""
    with torch.no_grad():
        for name in tables_of(model):
            weight = getattr(model, name).weight
            if weight.shape != tensors[name].shape:
                raise RuntimeError(f"{name} has shape {tuple(tensors[name].shape)}, the model {tuple(weight.shape)}")
            weight.data = tensors[name].to(weight.device, weight.dtype)
        for name in HEAD:
            if name in tensors:
                getattr(model, name).copy_(tensors[name])
        if model.has_head_offsets:
            model.head_offsets.copy_(tensors[HEAD_OFFSETS])
        if model.has_head_readout:
            if model.head_readout.shape != tensors[HEAD_READOUT].shape:
                raise RuntimeError(f"{HEAD_READOUT} has shape {tuple(tensors[HEAD_READOUT].shape)}, the model "
                                   f"{tuple(model.head_readout.shape)}")
            model.head_readout.copy_(tensors[HEAD_READOUT])
    load_adapter_tensors(model.adapters, tensors)


def save_checkpoint(directory: str | Path, model: CLLM4Rec, *, backbone: str, backbone_layers: int,
                    templates: PromptTemplates, max_history: int, user_ids: list[str], item_ids: list[str],
                    item_titles: list[str], item_texts: list[str], split: Split, data_fingerprint: str,
                    train_config: dict, metrics: dict) -> str:
    """Write the checkpoint; returns its model version id (derived from the embeddings' hash)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / EMBEDDINGS_FILE, model_tensors(model))
    _replace_atomically(directory / SPLIT_FILE, lambda tmp: save_numpy(split.to_arrays(), tmp))
    write_json(directory / IDS_FILE, {"users": user_ids, "items": item_ids, "titles": item_titles,
                                      "texts": item_texts})
    files = {name: sha256_file(directory / name) for name in (EMBEDDINGS_FILE, SPLIT_FILE, IDS_FILE)}
    model_version = f"{time.strftime('%Y%m%d')}-{files[EMBEDDINGS_FILE][:12]}"
    word_embeddings = model.backbone.get_input_embeddings()
    write_json(directory / META_FILE, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone": {
            "name": backbone,
            "layers": backbone_layers,
            "model_type": model.backbone.config.model_type,
            "n_words": word_embeddings.num_embeddings,
            "hidden_size": word_embeddings.embedding_dim,
        },
        "adapters": {"rank": model.adapter_rank, "layers": model.adapter_layers, "targets": model.adapter_targets}
        if model.adapters else None,
        "n_users": len(user_ids),
        "n_items": len(item_ids),
        "templates": templates.to_dict(),
        "max_history": max_history,
        "data_fingerprint": data_fingerprint,
        "train_config": train_config,
        "metrics": metrics,
        "files": files,
    })
    return model_version


def append_metrics(directory: str | Path, record: dict) -> None:
    with (Path(directory) / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --- reading ---------------------------------------------------------------------------------

def read_checkpoint(directory: str | Path, scoring_only: bool = False) -> Checkpoint:
    """Read and validate everything but the backbone. Raises CheckpointError saying what is wrong.

    scoring_only: leave the content view's tables on disk (serving and evaluation never read them;
    they are half of the memory per user). Every file is still checked against its checksum."""
    directory = Path(directory)
    try:
        is_directory = directory.is_dir()
    except OSError as e:  # a name too long, a loop of symbolic links, ...
        raise CheckpointError(f"{str(directory)[:200]}: not a usable path ({e.strerror})") from e
    if not is_directory:
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{directory}: not a checkpoint ({META_FILE} missing; was training interrupted "
                              "before the first save?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a cllm4rec checkpoint (format is {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{meta_path}: not a cllm4rec checkpoint")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{directory}: checkpoint format version {version}, this cllm4rec reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}; use the cllm4rec release that "
                              "wrote it or retrain")
    required = ("model_version", "backbone", "n_users", "n_items", "templates", "max_history", "files")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    backbone_fields = ("name", "layers", "n_words", "hidden_size")
    if not isinstance(meta["backbone"], dict) or any(k not in meta["backbone"] for k in backbone_fields):
        raise CheckpointError(f"{meta_path}: backbone must give {', '.join(backbone_fields)}")
    # Every data file is checksummed: a checkpoint.json that leaves one out is not trusted.
    unchecked = [name for name in (EMBEDDINGS_FILE, SPLIT_FILE, IDS_FILE)
                 if not isinstance(meta["files"], dict) or name not in meta["files"]]
    if unchecked:
        raise CheckpointError(f"{meta_path}: no checksum for {', '.join(unchecked)}")
    for name, digest in meta["files"].items():
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{directory}: {name} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{directory}: {name} does not match its checksum in {META_FILE} "
                                  "(corrupt, or overwritten by an interrupted save)")
    n_users, n_items = meta["n_users"], meta["n_items"]
    hidden = meta["backbone"]["hidden_size"]
    try:
        with safe_open(directory / EMBEDDINGS_FILE, framework="pt") as f:
            skipped = set(TABLES) - set(SCORING_TABLES) if scoring_only else set()
            embeddings = {name: f.get_tensor(name) for name in f.keys() if name not in skipped}
        split_arrays = load_numpy(directory / SPLIT_FILE)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{directory}: unreadable tensors ({e})") from e
    expected = {"collab_users": n_users, "collab_items": n_items, "content_users": n_users, "content_items": n_items}
    for name, rows in expected.items():
        if scoring_only and name not in SCORING_TABLES:
            continue
        tensor = embeddings.get(name)
        if tensor is None:
            raise CheckpointError(f"{directory}: {EMBEDDINGS_FILE} has no tensor {name!r}")
        if tuple(tensor.shape) != (rows, hidden):
            raise CheckpointError(f"{directory}: {name} has shape {tuple(tensor.shape)}, expected ({rows}, {hidden})")
    for name, shape in (("item_bias", (n_items,)), ("logit_scale", ()), ("head_projection", (hidden, hidden)),
                        (HEAD_OFFSETS, (n_items, hidden))):
        if version >= 2 and name not in embeddings and name != HEAD_OFFSETS:
            raise CheckpointError(f"{directory}: {EMBEDDINGS_FILE} has no tensor {name!r}")
        if name in embeddings and tuple(embeddings[name].shape) != shape:
            raise CheckpointError(f"{directory}: {name} has shape {tuple(embeddings[name].shape)}, expected {shape}")
    try:
        ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        texts = ids.get("texts", ids["titles"])  # checkpoints before the texts were saved: their titles
        sizes = len(ids["users"]), len(ids["items"]), len(ids["titles"]), len(texts)
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: {IDS_FILE} is not a users/items/titles object ({e})") from e
    if sizes != (n_users, n_items, n_items, n_items):
        raise CheckpointError(f"{directory}: {IDS_FILE} does not match the sizes in {META_FILE}")
    if set(split_arrays) != {"user", "item", "part"}:
        raise CheckpointError(f"{directory}: {SPLIT_FILE} must hold user, item and part arrays")
    if len(split_arrays["user"]) and (split_arrays["user"].max() >= n_users or split_arrays["item"].max() >= n_items):
        raise CheckpointError(f"{directory}: {SPLIT_FILE} refers to users or items beyond the checkpoint's")
    return Checkpoint(directory, meta, ids["users"], ids["items"], ids["titles"], texts, embeddings,
                      Split.from_arrays(split_arrays, n_users))


@dataclass
class Recommender:
    """What serving and evaluation need: the model with its embeddings, the token space and the maps."""

    checkpoint: Checkpoint
    model: CLLM4Rec
    space: TokenSpace
    user_index: dict[str, int]
    item_index: dict[str, int]
    popularity: np.ndarray  # training interactions per item

    @property
    def device(self) -> torch.device:
        return self.model.collab_items.weight.device

    @property
    def max_history(self) -> int:
        return self.checkpoint.meta["max_history"]


def build_model(checkpoint: Checkpoint, backbone_model, tokenizer) -> tuple[CLLM4Rec, TokenSpace]:
    """The model and token space of a checkpoint over an already loaded backbone."""
    meta = checkpoint.meta
    word_embeddings = backbone_model.get_input_embeddings()
    if word_embeddings.embedding_dim != meta["backbone"]["hidden_size"] or \
            word_embeddings.num_embeddings != meta["backbone"]["n_words"]:
        raise CheckpointError(
            f"backbone {meta['backbone']['name']!r} has {word_embeddings.num_embeddings} words of width "
            f"{word_embeddings.embedding_dim}; the checkpoint was trained on {meta['backbone']['n_words']} "
            f"of width {meta['backbone']['hidden_size']}")
    model = CLLM4Rec(backbone_model, meta["n_users"], meta["n_items"], init_std=None,
                     content_view=all(name in checkpoint.embeddings for name in TABLES),
                     head_offsets=HEAD_OFFSETS in checkpoint.embeddings,
                     head_readout=HEAD_READOUT in checkpoint.embeddings)
    if meta.get("adapters"):
        try:
            model.attach_adapters(meta["adapters"]["rank"], meta["adapters"]["layers"], meta["adapters"]["targets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{checkpoint.path}: {META_FILE} has unusable adapters ({e})") from e
    dtype = word_embeddings.weight.dtype
    device = word_embeddings.weight.device
    try:
        load_model_tensors(model, checkpoint.embeddings)
    except (KeyError, RuntimeError) as e:  # a tensor (a table, an adapter's) missing or of another shape
        raise CheckpointError(f"{checkpoint.path}: {EMBEDDINGS_FILE} does not fit the model ({e})") from e
    model.to(device=device, dtype=dtype)
    model.eval()
    space = TokenSpace(tokenizer, word_embeddings.num_embeddings, meta["n_users"], meta["n_items"],
                       checkpoint.templates)
    return model, space


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_recommender(directory: str | Path, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> Recommender:
    """Read a checkpoint and put it on the GPU when there is one, else the CPU. Weights in float32 by
    default; on CUDA the forward pass then computes in bfloat16 (score_prompts). Only the scoring view
    is loaded: the content tables stay on disk (docs/deployment.md, memory)."""
    checkpoint = read_checkpoint(directory, scoring_only=True)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    backbone = checkpoint.meta["backbone"]
    backbone_model, tokenizer = load_backbone(backbone["name"], backbone["layers"], device, dtype)
    model, space = build_model(checkpoint, backbone_model, tokenizer)
    checkpoint.embeddings.clear()  # the model holds them now: a second copy would double the memory per user
    popularity = np.bincount(np.concatenate(checkpoint.split.train), minlength=checkpoint.meta["n_items"])
    return Recommender(
        checkpoint=checkpoint,
        model=model,
        space=space,
        user_index={u: i for i, u in enumerate(checkpoint.user_ids)},
        item_index={it: i for i, it in enumerate(checkpoint.item_ids)},
        popularity=popularity,
    )
