"""Features of a frozen backbone, computed once per image (and per augmented view) and cached.

The cache is keyed by the file's content (not its name), the backbone and its weights (the
backbone's only: the head never changes what the frozen part computes, so runs with different
heads share the features), where the backbone is cut, the preprocessing, the augmentation and the
number of views, so a stale entry can never be used; it is a folder of shards per frozen part (FeatureStore). The frozen part runs in
ONNX Runtime on a CPU (faster than PyTorch eager there: bench/RESULTS.md), in PyTorch where the
export fails (with a warning), and on a GPU where the model is."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..cache import cache_root, digest, file_digest
from ..data.loaders import DecodeAhead
from ..data.rows_on_disk import safetensors_offsets
from ..data.transforms import BatchAugment, Preprocess, batch_to_input
from ..errors import first_line
from ..heap import large_blocks_mapped
from ..progress import Reporter, warn
from .feature_rows import SAFETENSORS_DTYPES, FeatureRows

# how the cache stores features: float16 halves the disk, the reads and what a held split takes;
# its rounding is a relative 2**-11 of each value
STORE_DTYPE = torch.float16
STORE_FORMAT = "float16"


class FrozenPart(nn.Module):
    """Units [0, cut) of a TransferModel; at the full depth, pooled to a vector."""

    def __init__(self, model, cut: int):
        super().__init__()
        self.model, self.cut, self.full = model, cut, cut >= model.n_units

    def forward(self, x):
        f = self.model.features_until(self.cut, x)
        return self.model.pooled(f) if self.full else f


@dataclass(frozen=True)
class MirrorConfig:
    mirror: bool = True  # what keys a mirrored view in the cache (see extract_features' aug_tag)


class Mirror:
    """The "augmentation" of the mirrored view that test-time augmentation averages with the
    image: every image flipped left-right, whatever the generator."""

    cfg = MirrorConfig()

    def __call__(self, x: torch.Tensor, g=None) -> torch.Tensor:
        return x.flip(-1)


class FeatureInputs:
    """One view per image: a random cached view in training, the clean view 0 in evaluation."""

    def __call__(self, features: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None or features.shape[1] == 1:
            return features[:, 0]
        views = torch.randint(0, features.shape[1], (len(features),), generator=generator)
        return features[torch.arange(len(features)), views]


def weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class _Runner:
    """Runs the frozen part on a float batch: ONNX Runtime where possible, PyTorch otherwise."""

    memory_format = torch.contiguous_format  # what ONNX Runtime takes without a copy

    def __init__(self, frozen: FrozenPart, key: str, channels: int, size: int, folder: Path):
        self.frozen, self.session = frozen.eval(), None
        self.device = next(frozen.parameters()).device
        if self.device.type != "cpu":  # on a GPU the model itself, where it already is
            self._eager()
            return
        try:
            import onnxruntime as ort
            path = folder / f"{key}.onnx"
            if not path.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    tmp_path = Path(tmp) / "model.onnx"
                    # no constant folding: ONNX Runtime folds the graph itself when it loads it, so
                    # the exporter's own pass would only add to the export's time
                    torch.onnx.export(frozen, torch.zeros(1, channels, size, size), str(tmp_path), input_names=["x"],
                                      output_names=["y"], dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False,
                                      do_constant_folding=False)
                    os.replace(tmp_path, path)
            options = ort.SessionOptions()
            # one thread per run, as many concurrent runs as cores: small batches side by side beat
            # one batch split across threads
            options.intra_op_num_threads = 1
            # no busy-waiting between batches: the decoding workers need those cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            threads = torch.get_num_threads()
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="features") if threads > 1 else None
        except Exception as e:  # a backbone the exporter or ONNX Runtime cannot handle: eager PyTorch
            warn(f"features computed in PyTorch, not ONNX Runtime ({first_line(e)}); this is slower")
            self._eager()

    def _eager(self) -> None:
        self.session = None
        self.frozen = self.frozen.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last

    # one image per ONNX Runtime call: a single image's activations stay in the CPU's cache, and the
    # rate falls with every larger batch (bench/RESULTS.md)
    chunk = 1
    pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            def run(part):
                return torch.from_numpy(self.session.run(None, {"x": part.contiguous().numpy()})[0])
            parts = x.split(self.chunk)
            return torch.cat(list(self.pool.map(run, parts)) if self.pool else [run(p) for p in parts])
        size = 8 if self.device.type == "cpu" else 64
        return torch.cat([self.frozen(part.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()
                          .contiguous() for part in x.split(size)])


def extract_features(model, cut: int, parts: dict, pre: Preprocess, augment: BatchAugment | None, seed: int,
                     reporter: Reporter, batch_size: int = 32, decoding: DecodeAhead | None = None, dist=None):
    """Features at `cut` for several splits in one pass over the files that miss the cache.

    parts: {name: (paths, labels, views)}. Returns ({name: FeatureRows of cached features, N x (1 + views)
    x ..., float16 in the cache's shards}, [(path, reason)] of the unreadable ones). A file's clean
    features are stored under its content digest, its augmented views under digest + augmentation +
    seed + view number. What is computed goes into the cache a shard at a time as it comes, so no
    more than a shard of it is held. `decoding`: the images already being decoded (a DecodeAhead
    with this preprocessing over these files), used instead of decoding them again; it is closed
    here either way. Under torchrun (`dist`) each rank computes every world-th of the missing
    files, and the ranks exchange what they computed in rounds (_FeatureSink)."""
    frozen = FrozenPart(model, cut)
    # the backbone's weights alone: the frozen part is units of the backbone, and a key that also
    # hashed the (randomly initialised) head would keep audit, tune and train from sharing features.
    # The folder name also changes with this key, so stores keyed the old way are simply not found.
    wdigest = weights_digest(model.backbone)
    features_dir = cache_root() / "features"
    # STORE_FORMAT in the key: shards of another storage format are never mixed into a store
    folder = features_dir / digest(model.backbone_name, wdigest, cut, pre.to_dict(), STORE_FORMAT)
    store = FeatureStore(folder)
    aug_tag = digest(asdict(augment.cfg), seed)[:12] if augment is not None else None
    names = {}  # path -> entry names it needs
    digests = {}
    for paths, _, views in parts.values():
        for p in paths:
            digests.setdefault(p, file_digest(p))
            d = digests[p]
            if d is not None:
                wanted = [d] + ([f"{d}:{aug_tag}:{v}" for v in range(1, views + 1)] if aug_tag else [])
                names[p] = list(dict.fromkeys(names.get(p, []) + wanted))
    failures = [(p, "cannot read file") for p, d in digests.items() if d is None]
    todo = {p: [n for n in ns if n not in store] for p, ns in names.items()}
    todo = {p: ns for p, ns in todo.items() if ns}
    missing = len(todo)
    distributed = dist is not None and dist.enabled
    if distributed:  # this rank's share, in an order every rank agrees on
        todo = {p: todo[p] for p in sorted(todo)[dist.rank::dist.world]}
    if decoding is not None and (decoding.pre != pre or not set(todo) <= set(decoding.paths)):
        decoding.close()
        decoding = None
    if missing:
        sink = _FeatureSink(store, dist if distributed else None, -(-missing // (dist.world if distributed else 1)))
        if todo:
            def make_runner():
                return _Runner(frozen, digest(model.backbone_name, wdigest, cut, pre.channels, pre.size),
                               pre.channels, pre.size, features_dir)
            decoding = decoding or DecodeAhead(list(todo), pre, batch_size)  # the workers start decoding now
            try:
                failures += _compute(make_runner, decoding, todo, pre, augment, seed, sink, reporter)
            finally:
                decoding.close()
        sink.finish()
        if distributed:
            shares: list = [None] * dist.world
            torch.distributed.all_gather_object(shares, failures)
            failures = list(dict.fromkeys(f for fs in shares for f in fs))
            dist.barrier()  # every shard written before any rank reads the store again
        store = FeatureStore(folder)
    else:
        if decoding is not None:
            decoding.close()
        reporter.info(f"features: all {len(names)} images found in the cache")
    return _splits(parts, store, digests, aug_tag, {p for p, _ in failures}), failures


def _splits(parts: dict, store: "FeatureStore", digests: dict, aug_tag: str | None, failed: set) -> dict:
    """Each split's entries as rows of the store (N x views, where each is in which shard): nothing
    is read here."""
    out = {}
    for name, (paths, labels, views) in parts.items():
        keep = [i for i, p in enumerate(paths) if p not in failed]
        keys = [[d] + [f"{d}:{aug_tag}:{v}" for v in range(1, views + 1) if aug_tag]
                for d in (digests[paths[i]] for i in keep)]
        out[name] = store.rows(keys, torch.tensor([labels[i] for i in keep], dtype=torch.long),
                               [paths[i] for i in keep])
    return out


class _FeatureSink:
    """Where computed features go: converted to the store's float16 and written as a shard once
    `shard_bytes` of them are waiting, so a run holds at most that much of them. Under torchrun
    every rank needs every feature: the ranks exchange what they computed in rounds of
    `files_per_round` files (every rank takes part in the same number of rounds, padding with
    empty ones), and one rank per machine writes the shards into its machine's cache."""

    def __init__(self, store: "FeatureStore", dist, share: int, shard_bytes: int = 128 * 2**20,
                 files_per_round: int = 512):
        self.store, self.dist, self.shard_bytes, self.files_per_round = store, dist, shard_bytes, files_per_round
        self.rounds = -(-share // files_per_round)  # the largest rank share's rounds
        self.waiting: dict[str, torch.Tensor] = {}
        self.waiting_bytes = self.files_done = self.rounds_done = 0

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.to(STORE_DTYPE, copy=True)  # a copy: the batch's output is freed once all its rows are put
        self.waiting[key] = value
        self.waiting_bytes += value.nbytes

    def done(self, files: int) -> None:
        self.files_done += files
        if self.dist is None:
            if self.waiting_bytes >= self.shard_bytes:
                self._write(self.waiting)
        else:
            while self.rounds_done < min(self.rounds, self.files_done // self.files_per_round):
                self._exchange()

    def finish(self) -> None:
        if self.dist is None:
            self._write(self.waiting)
            return
        while self.rounds_done < self.rounds:
            self._exchange()

    def _exchange(self) -> None:
        shares: list = [None] * self.dist.world
        torch.distributed.all_gather_object(shares, self.waiting)
        self.waiting, self.waiting_bytes = {}, 0
        self.rounds_done += 1
        if self.dist.local_rank == 0:
            self._write({k: v for share in shares for k, v in share.items()})

    def _write(self, entries: dict) -> None:
        if entries:
            self.store.add(entries, self.shard_bytes)
        self.waiting, self.waiting_bytes = {}, 0


def _compute(make_runner, decoding: DecodeAhead, todo: dict, pre, augment, seed, sink, reporter):
    runner = make_runner()  # exporting the frozen part overlaps with the decoding workers
    # The decoding workers need the cores while ONNX Runtime (its own threads) is idle; torch's
    # OpenMP threads would only spin against them for the cheap tensor work done here.
    threads = torch.get_num_threads()
    onnx = runner.session is not None
    if onnx:
        torch.set_num_threads(1)
    # image batches from mmap, else the heap grows by their size with every batch; only around ONNX
    # Runtime, which keeps its activations in its own arena: an eager backbone's must stay on the heap
    # (heap.py)
    mapped = large_blocks_mapped() if onnx else contextlib.nullcontext()
    try:
        with mapped:
            return _compute_batches(runner, decoding, todo, pre, augment, seed, sink, reporter)
    finally:
        runner.close()
        torch.set_num_threads(threads)


def _compute_batches(runner, decoding, todo, pre, augment, seed, sink, reporter):
    failures, paths = [], decoding.paths
    with reporter.bar("features", len(todo)) as bar:
        for chunk in decoding:
            chunk = [item for item in chunk if paths[item[0]] in todo]  # the others are cached already
            failures += [(paths[i], reason) for i, img, reason in chunk if img is None]
            good = [(i, img) for i, img, _ in chunk if img is not None]
            by_view: dict[int, list] = {}
            for i, img in good:
                for entry in todo[paths[i]]:
                    view = int(entry.rsplit(":", 1)[1]) if ":" in entry else 0
                    by_view.setdefault(view, []).append((i, img, entry))
            for view, items in sorted(by_view.items()):
                batch = torch.stack([img for _, img, _ in items])
                if view == 0:
                    x = batch_to_input(batch, pre, memory_format=runner.memory_format)
                else:  # one generator per image and view: its augmentation does not depend on the batch
                    gens = [torch.Generator().manual_seed(int(e.split(":")[0][:12], 16) ^ (seed * 7919 + view))
                            for _, _, e in items]
                    x = batch_to_input(batch, pre, augment, gens, memory_format=runner.memory_format)
                for (_, _, entry), f in zip(items, runner(x)):
                    sink.put(entry, f)
            sink.done(len(chunk))
            bar.advance(len(chunk))
    return failures


class FeatureStore:
    """The cached features of one frozen part (backbone, weights, cut, preprocessing): a folder of
    safetensors shards of float16 entries, written as runs compute them. Entries are keyed by
    file content (and view), so one store serves every dataset; a run reads only the entries it
    needs (the shards' headers say which holds what and where) and writes only what it computed,
    so memory and disk work follow the run, not everything ever cached. A damaged shard is
    skipped: its entries are computed again, never trusted (a shard is opened at indexing, which
    checks its header against the file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards: list[Path] = []
        self.where: dict[str, tuple[int, int]] = {}  # key -> (shard number, byte offset)
        self.entry: tuple | None = None  # (dtype name, shape): one for every entry of the store
        for shard in sorted(folder.glob("*.safetensors")):
            try:  # opening checks the header against the file's size, so a truncated shard fails here
                with _open(shard):
                    pass
                offsets, entries = safetensors_offsets(shard)
                kinds = set(entries.values())
                if len(kinds) > 1 or (self.entry is not None and kinds and kinds != {self.entry}):
                    raise ValueError(f"entries of other shapes or types than the store's: {sorted(kinds)}")
            except Exception as e:
                warn(f"damaged feature-cache shard {shard} skipped ({first_line(e)}); its features are computed again")
                continue
            if kinds:
                self.entry = kinds.pop()
            number = len(self.shards)
            self.shards.append(shard)
            for key, offset in offsets.items():
                self.where.setdefault(key, (number, offset))

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def rows(self, keys: list[list[str]], labels: torch.Tensor, paths: list) -> FeatureRows:
        """The entries `keys[i][v]` as a split's rows (image i, view v), read from the shards when used."""
        views = len(keys[0]) if keys else 0
        located = np.array([[self.where[k] for k in row] for row in keys], dtype=np.int64).reshape(len(keys), views, 2)
        dtype, shape = self.entry if self.entry is not None else ("F16", ())
        return FeatureRows(self.shards, located[..., 0].astype(np.int32), located[..., 1], shape,
                           SAFETENSORS_DTYPES[dtype], labels, paths)

    def add(self, entries: dict[str, torch.Tensor], shard_bytes: int = 256 * 2**20) -> None:
        """Write `entries` (each its own tensor) as shards of at most ~shard_bytes: the writer
        holds a byte copy of what it writes, so this bounds the extra memory of saving."""
        from safetensors.torch import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(entries)
        start = 0
        while start < len(keys):
            end, size = start, 0
            while end < len(keys) and (end == start or size + entries[keys[end]].nbytes <= shard_bytes):
                size += entries[keys[end]].nbytes
                end += 1
            chunk = keys[start:end]
            name = digest(*chunk)[:24]
            tmp = self.folder / f".{name}.{os.getpid()}.tmp"
            save_file({k: entries[k].contiguous() for k in chunk}, str(tmp))
            os.replace(tmp, self.folder / f"{name}.safetensors")
            start = end


def _open(shard: Path):
    from safetensors import safe_open
    return safe_open(str(shard), framework="pt")
