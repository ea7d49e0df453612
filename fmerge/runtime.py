"""The context a recipe runs in: its store, device, and models resolved to sources and hashes.

Steps never read each other's plans through it: the executor hands each step the planned
artifacts of the steps it depends on, and binds the outputs of model-producing steps here
(`bind_output`) so that `source` and `model_hash` can serve those models.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from rich.console import Console

from . import distributed
from .errors import ModelError, RecipeError
from .fingerprint import FileHashes
from .io import HashCache, ModelDir, TensorSource
from .lora import LoraMerged, adapter_refusal, is_adapter_dir
from .recipe import BASE, ModelSpec, Recipe
from .store import Store


class Runtime:
    def __init__(self, recipe: Recipe, store: Store, console: Console | None = None, device: str | None = None):
        self.recipe, self.store = recipe, store
        # Every artifact this run writes records the recipe that asked for it (not part of its key).
        store.provenance = {"recipe": {"file": str(recipe.file) if recipe.file else None,
                                       "spec": recipe.spec.model_dump(mode="json")}}
        self.console = console or Console(stderr=True)
        where = "--device" if device else recipe.where("device")
        # A store opened read-only (status, gc) computes nothing: the device need not be here.
        self.device = distributed.init(device or recipe.spec.device, where, available=store.writable)
        # Hash caches live in the store; a store opened read-only (status, gc) is never written.
        self.hashes = HashCache(store.hash_cache_file, write=store.writable)
        # Data files and models' side files (config, tokenizer, processor: tasks.side_inputs), by bytes.
        self.data_hashes = FileHashes(store.root / "cache" / "data_hashes.json", write=store.writable)
        self.planned: dict[str, list] = {}  # the executor's record of this run's plan, for callers
        self.outputs: dict[str, str] = {}  # model-producing step -> its artifact key (set by the executor)
        self.results: dict[str, list[dict]] = {}  # eval step -> result rows, for the report
        self.sweep_results: dict[str, list[dict]] = {}  # eval step -> per swept merge, selection curves
        self._sources: dict[str, TensorSource] = {}
        self._dirs: dict[str, Path | None] = {}
        self._hashes: dict[str, str] = {}
        self._files_hashed: dict[str, list[Path]] = {}  # model -> the weight files its hash covers
        self.key_files_of: dict[str, set[Path]] = {}  # step -> files whose bytes entered its keys (`planning`)

    def key_files(self) -> set[Path]:
        """Every file whose bytes entered a key this run planned (resolved paths): models' weight
        files, data files, and models' side files (config, tokenizer, processor). What a step
        computes from must be among these or in the store (tests/test_keys_cover_reads.py)."""
        return self.hashes.files | self.data_hashes.files

    @contextmanager
    def planning(self, step: str):
        """Record in `key_files_of[step]` the files whose bytes enter the keys `step` plans."""
        outer = self.hashes.files, self.data_hashes.files
        self.hashes.files, self.data_hashes.files = set(), set()
        try:
            yield
        finally:
            self.key_files_of[step] = self.key_files()
            self.hashes.files, self.data_hashes.files = outer[0] | self.hashes.files, outer[1] | self.data_hashes.files

    def bind_output(self, step: str, key: str) -> None:
        self.outputs[step] = key

    def output_of(self, step: str) -> str:
        if step not in self.outputs:
            raise RecipeError(f"Step '{step}' has not been planned yet; models made by a step can be used only by "
                              f"steps that run after it.")
        return self.outputs[step]

    def spec(self, name: str) -> ModelSpec:
        return self.recipe.base if name == BASE else self.recipe.models[name]

    def label(self, name: str) -> str:
        return "base" if name == BASE else name

    def model_dir(self, name: str) -> Path | None:
        """The model's local directory (config, tokenizer), downloading a hub id if needed."""
        if name not in self._dirs:
            spec = self.spec(name)
            if spec.from_step is not None:
                self._dirs[name] = None
            else:
                local = self.recipe.resolve(spec.path)
                if local.exists():
                    self._dirs[name] = local
                elif self.recipe.is_hub_id(spec.path):
                    self._dirs[name] = download_hub_model(spec.path, spec.revision)
                else:
                    raise ModelError(f"Model '{self.label(name)}': {local} does not exist.")
        return self._dirs[name]

    def source(self, name: str) -> TensorSource:
        """A model's tensors, lazily: a model directory, or the artifact of the step that made it."""
        if name not in self._sources:
            spec = self.spec(name)
            if spec.from_step is not None:
                key = self.output_of(spec.from_step)
                self._sources[name] = self.store.open(key).view("weights/")
            elif is_adapter_dir(self.model_dir(name)):  # a PEFT LoRA adapter: the base with ΔW added (fmerge/lora.py)
                if name == BASE:
                    raise ModelError(adapter_refusal(self.model_dir(name), self.label(name)))
                self._sources[name] = LoraMerged(self.source(BASE), ModelDir(self.model_dir(name), label=self.label(name)),
                                                 self.label(name))
            else:
                self._sources[name] = ModelDir(self.model_dir(name), allow_pickle=self.recipe.spec.allow_pickle,
                                               label=self.label(name))
                if self.recipe.is_clip:  # CLIP: only the vision tower, named vision_model.* (fmerge/clip.py)
                    from .clip import VisionTower

                    self._sources[name] = VisionTower(self._sources[name], self.label(name))
        return self._sources[name]

    def model_hash(self, name: str) -> str:
        """Content hash of a model; for a step's output, that artifact's key (known before it exists)."""
        if name not in self._hashes:
            spec = self.spec(name)
            if spec.from_step is not None:
                self._hashes[name] = "artifact:" + self.output_of(spec.from_step)
            else:
                src = self.source(name)
                src = getattr(src, "inner", src)  # a CLIP vision tower: hash the whole checkpoint
                if isinstance(src, LoraMerged):
                    self._hashes[name] = src.content_key(self.hashes.hash_model(src.adapter), self.model_hash(BASE))
                    return self._hashes[name]
                assert isinstance(src, ModelDir)
                self._hashes[name] = self.hashes.hash_model(src)
        self.hashes.files.update(self._weight_files(name))  # also when remembered: each step's ledger
        return self._hashes[name]

    def _weight_files(self, name: str) -> list[Path]:
        """The files a model's content hash covers (none for a step's output: its key stands for it)."""
        if name not in self._files_hashed:
            src = self.source(name) if self.spec(name).from_step is None else None
            src = getattr(src, "inner", src)
            if src is None:
                files = []
            elif isinstance(src, LoraMerged):
                files = [f.resolve() for f in src.adapter.weight_files()] + self._weight_files(BASE)
            else:
                files = [f.resolve() for f in src.weight_files()]
            self._files_hashed[name] = files
        return self._files_hashed[name]

    def model_hashes(self, names: list[str]) -> dict[str, str]:
        """Content hashes of several models, up to four at a time (reading and BLAKE3 release the
        GIL): a cold disk reads 3 files at once ~2.7x faster than one after another (BENCHMARKS.md)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [n for n in dict.fromkeys(names) if n not in self._hashes]
        with ThreadPoolExecutor(max_workers=max(1, min(4, len(todo)))) as pool:
            list(pool.map(self.model_hash, todo))
        return {n: self.model_hash(n) for n in names}


def download_hub_model(repo: str, revision: str | None) -> Path:
    """Fetch weights, config and tokenizer of a hub model (safetensors only, never pickles)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"Model '{repo}' is a hub id but HF_HUB_OFFLINE=1; download it first or give a local path.")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo, revision=revision, allow_patterns=[
            "*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model"])
    except Exception as exc:  # network, auth, missing repo: all user-facing
        raise ModelError(f"Could not download model '{repo}' from the hub ({type(exc).__name__}: {exc}). "
                          f"Check the id and your network, or give a local directory.")
    return Path(path)
