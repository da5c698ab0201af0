"""Features of a frozen backbone, computed once per image (and per augmented view) and cached.

The cache is keyed by the file's content (not its name), the backbone and its weights, where the
backbone is cut, the preprocessing, the augmentation and the number of views, so a stale entry can
never be used; it is a folder of shards per frozen part (FeatureStore). The frozen part runs in
ONNX Runtime on a CPU (faster than PyTorch eager there: bench/RESULTS.md), in PyTorch where the
export fails (with a warning), and on a GPU where the model is."""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_root, digest, file_digest
from ..data.loaders import DecodeAhead, SplitData
from ..data.transforms import BatchAugment, Preprocess, batch_to_input
from ..errors import first_line
from ..progress import Reporter, warn


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

    parts: {name: (paths, labels, views)}. Returns ({name: SplitData of cached features, N x views x ...},
    [(path, reason)] of the unreadable ones). A file's clean features are stored under its content
    digest, its augmented views under digest + augmentation + seed + view number. `decoding`: the
    images already being decoded (a DecodeAhead with this preprocessing over these files), used
    instead of decoding them again; it is closed here either way. Under torchrun (`dist`) each
    rank computes every world-th of the missing files, then all ranks exchange what they computed."""
    frozen = FrozenPart(model, cut)
    wdigest = weights_digest(frozen)
    features_dir = cache_root() / "features"
    store = FeatureStore(features_dir / digest(model.backbone_name, wdigest, cut, pre.to_dict()))
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
    if dist is not None and dist.enabled:  # this rank's share, in an order every rank agrees on
        todo = {p: todo[p] for p in sorted(todo)[dist.rank::dist.world]}
    if decoding is not None and (decoding.pre != pre or not set(todo) <= set(decoding.paths)):
        decoding.close()
        decoding = None
    computed: dict[str, torch.Tensor] = {}
    if todo:
        def make_runner():
            return _Runner(frozen, digest(model.backbone_name, wdigest, cut, pre.channels, pre.size),
                           pre.channels, pre.size, features_dir)
        decoding = decoding or DecodeAhead(list(todo), pre, batch_size)  # the workers start decoding now
        try:
            failures += _compute(make_runner, decoding, todo, pre, augment, seed, computed, reporter)
        finally:
            decoding.close()
    elif decoding is not None:
        decoding.close()
    if missing and dist is not None and dist.enabled:
        shares: list = [None] * dist.world
        torch.distributed.all_gather_object(shares, (computed, failures))
        failures = list(dict.fromkeys(f for _, fs in shares for f in fs))
        computed = {k: v for share, _ in shares for k, v in share.items()}
    if missing:
        if dist is None or dist.main:
            store.add(computed)
    else:
        reporter.info(f"features: all {len(names)} images found in the cache")
    with store.reader() as cached:
        return _splits(parts, computed, cached, digests, aug_tag, {p for p, _ in failures}), failures


def _splits(parts: dict, computed: dict, cached, digests: dict, aug_tag: str | None,
            failed: set) -> dict[str, SplitData]:
    """Each split's entries copied into one tensor (N x views x ...): from this run's `computed`
    (rows of batch outputs, each dropped at its last use, so a batch's memory is freed as soon as
    all its rows are copied) or read from the cache one by one, so the features are held about
    once, not twice, at the peak."""
    def entries(path, views):
        d = digests[path]
        return [d] + [f"{d}:{aug_tag}:{v}" for v in range(1, views + 1) if aug_tag]

    uses: dict[str, int] = {}
    for paths, _, views in parts.values():
        for p in paths:
            if p not in failed:
                for key in entries(p, views):
                    uses[key] = uses.get(key, 0) + 1
    out = {}
    for name, (paths, labels, views) in parts.items():
        keep = [i for i, p in enumerate(paths) if p not in failed]
        tensor = None
        for row, i in enumerate(keep):
            keys = entries(paths[i], views)
            for col, key in enumerate(keys):
                value = computed[key] if key in computed else cached(key)
                if tensor is None:
                    tensor = torch.empty((len(keep), len(keys), *value.shape), dtype=value.dtype)
                tensor[row, col] = value
                uses[key] -= 1
                if uses[key] == 0 and key in computed:
                    del computed[key]
        out[name] = SplitData(tensor if tensor is not None else torch.zeros(0),
                              torch.tensor([labels[i] for i in keep], dtype=torch.long), [paths[i] for i in keep])
    return out


def _compute(make_runner, decoding: DecodeAhead, todo: dict, pre, augment, seed, stored, reporter):
    runner = make_runner()  # exporting the frozen part overlaps with the decoding workers
    # The decoding workers need the cores while ONNX Runtime (its own threads) is idle; torch's
    # OpenMP threads would only spin against them for the cheap tensor work done here.
    threads = torch.get_num_threads()
    if runner.session is not None:
        torch.set_num_threads(1)
    try:
        return _compute_batches(runner, decoding, todo, pre, augment, seed, stored, reporter)
    finally:
        runner.close()
        torch.set_num_threads(threads)


def _compute_batches(runner, decoding, todo, pre, augment, seed, stored, reporter):
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
                # rows of the batch's output, not copies: freed together once all are used
                for (_, _, entry), f in zip(items, runner(x)):
                    stored[entry] = f
            bar.advance(len(chunk))
    return failures


class FeatureStore:
    """The cached features of one frozen part (backbone, weights, cut, preprocessing): a folder of
    safetensors shards, one written by each run that computed something. Entries are keyed by
    file content (and view), so one store serves every dataset; a run reads only the entries it
    needs (the shards' headers say which holds what) and writes only what it computed, so memory
    and disk work follow the run, not everything ever cached. A damaged shard is skipped: its
    entries are computed again, never trusted (a shard is opened at indexing, which checks its
    header against the file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            try:  # opening checks the header against the file's size, so a truncated shard fails here
                with _open(shard) as f:
                    for key in f.keys():
                        self.where.setdefault(key, shard)
            except Exception as e:
                warn(f"damaged feature-cache shard {shard} skipped ({first_line(e)}); its features are computed again")
                continue

    def __contains__(self, key: str) -> bool:
        return key in self.where

    @contextmanager
    def reader(self):
        """get(key) -> tensor, each read straight from its shard (shards opened once)."""
        handles: dict[Path, object] = {}
        with ExitStack() as stack:
            def get(key: str) -> torch.Tensor:
                shard = self.where[key]
                if shard not in handles:
                    handles[shard] = stack.enter_context(_open(shard))
                return handles[shard].get_tensor(key)
            yield get

    def add(self, entries: dict[str, torch.Tensor], shard_bytes: int = 256 * 2**20) -> None:
        """Write `entries` as shards of at most ~shard_bytes: the writer holds a byte copy of what
        it writes, so this bounds the extra memory a large run needs to save its features."""
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
            save_file({k: entries[k].clone() for k in chunk}, str(tmp))  # clones: rows of one batch share memory
            os.replace(tmp, self.folder / f"{name}.safetensors")
            start = end


def _open(shard: Path):
    from safetensors import safe_open
    return safe_open(str(shard), framework="pt")
