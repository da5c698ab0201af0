"""Look inside a model: class activation maps (Grad-CAM and its family, via pytorch-grad-cam),
first-layer filters and feature maps. Works on a saved artifact; never imports training code.

Plain Grad-CAM, the default and the one every training report and the service's /v1/explain use,
is computed here in a few lines of PyTorch: importing pytorch-grad-cam pulls in scikit-learn, SciPy,
OpenCV and torchvision's transforms, about 1 s per process, which would be a tenth of a whole
transfer-learning run. tests/test_explain.py checks that both give the same maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.decode import decode_image
from .data.transforms import batch_to_input, image_to_uint8
from .errors import UserError
from .inference import softmax_probabilities
from .tta import probabilities as tta_probabilities

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "layercam")


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "eigencam": EigenCAM,
            "layercam": LayerCAM}[method]  # Explainer has checked the name


def find_layer(model: nn.Module, name: str | None, arch: dict | None = None) -> nn.Module:
    """The named layer; without a name, the layer the model's family chooses for Grad-CAM (its last
    convolutional stage: where spatial detail and class evidence meet)."""
    if name is None:
        from .models.registry import family_of, last_conv
        return family_of(arch).gradcam_layer(model) if arch is not None else last_conv(model)
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise UserError(f"no layer {name!r} in the model (some names: {', '.join(names)} ...)") from None


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017) as pytorch-grad-cam computes it: the target layer's
    activations weighted by the spatial mean of the class score's gradient, summed over channels,
    ReLU, scaled to [0, 1] per image, resized (bilinear) to the input and scaled again."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model, self._activations = model, None
        self._hook = layer.register_forward_hook(self._start_graph_here)

    def _start_graph_here(self, module, inputs, output):
        # The autograd graph starts at the target layer: with the weights not requiring gradients,
        # the forward pass up to here records nothing and the backward pass only runs through what
        # follows the layer (for a backbone's last stage: pooling and the head). A clone goes on,
        # so an in-place operation after the layer cannot touch the activations kept here.
        self._activations = output.detach().requires_grad_(True)
        return self._activations.clone()

    def release(self) -> None:
        self._hook.remove()

    def __call__(self, x: torch.Tensor, class_index=None) -> tuple[np.ndarray, np.ndarray]:
        """Image batch -> (heatmaps N x H x W in [0, 1], probabilities N x K). `class_index`: the
        class to explain, one for all images or one per image; by default each image's top class."""
        with torch.enable_grad():
            logits = self.model(x).float()
            activations, self._activations = self._activations, None
            targets = logits.argmax(1) if class_index is None else torch.as_tensor(class_index).expand(len(x))
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activations)
        with torch.no_grad():
            cam = torch.relu((grads.mean((2, 3), keepdim=True) * activations).sum(1, keepdim=True).float())
            cam = torch.nn.functional.interpolate(_unit_scale(cam), size=x.shape[2:], mode="bilinear",
                                                  align_corners=False)
            return _unit_scale(cam)[:, 0].numpy(), softmax_probabilities(logits)


def _unit_scale(cam: torch.Tensor) -> torch.Tensor:
    cam = cam - cam.amin((2, 3), keepdim=True)
    return cam / (1e-7 + cam.amax((2, 3), keepdim=True))


class Explainer:
    """Heatmaps for one model, one CAM object reused for every image (hooks registered once, so
    memory stays flat over thousands of images)."""

    def __init__(self, art, method: str = "gradcam", layer: str | None = None):
        self.art, self.method = art, method
        if method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
        self.model = art.model.eval()
        for p in self.model.parameters():
            # pytorch-grad-cam takes gradients through the weights' graph; pixclass's Grad-CAM
            # starts its graph at the layer (weights never change here either way)
            p.requires_grad_(method != "gradcam")
        self.layer = find_layer(self.model, layer, art.arch)
        if method == "gradcam":
            self.cam = GradCAM(self.model, self.layer)
        else:
            self.cam = _cam_class(method)(model=self.model, target_layers=[self.layer])
            if hasattr(self.cam, "batch_size"):
                self.cam.batch_size = 32  # ScoreCAM's masked forward passes

    def close(self) -> None:
        if isinstance(self.cam, GradCAM):
            self.cam.release()
        else:
            self.cam.activations_and_grads.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def heatmaps(self, images: list, class_index: int | None = None):
        """PIL images (or paths/bytes) -> (heatmaps N x H x W in [0, 1], probabilities N x K,
        uint8 inputs N x C x H x W as the model saw them). The probabilities are the ones predict
        and the service give, the artifact's test-time augmentation included; the maps are of the
        plain network on the image as it is (a map of the mirrored view would be of another
        picture), for the class those probabilities rank first unless `class_index` names one."""
        pre = self.art.preprocess
        batch = torch.stack([image_to_uint8(img if hasattr(img, "mode") else decode_image(img, pre.channels), pre)
                             for img in images])
        if isinstance(self.cam, GradCAM):  # channels_last: PyTorch's CPU convolutions are ~1.5x faster in it
            x = batch_to_input(batch, pre)
            if self.art.tta == "none" and self.art.temperature == 1.0 and not self.art.multilabel:
                # the CAM's own forward pass gives the probabilities
                maps, probs = self.cam(x, class_index)
                return maps, probs, batch
            probs = self._probabilities(x)
            maps, _ = self.cam(x, class_index if class_index is not None else probs.argmax(1))
            return maps, probs, batch
        x = batch_to_input(batch, pre, memory_format=torch.contiguous_format)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        probs = self._probabilities(x)  # the CAM library runs its own forward passes
        targets = [ClassifierOutputTarget(class_index if class_index is not None else int(p.argmax())) for p in probs]
        maps = self.cam(input_tensor=x, targets=targets)
        return np.asarray(maps, dtype=np.float32), probs, batch

    def _probabilities(self, x: torch.Tensor) -> np.ndarray:
        # a forward pass outside the CAM's: the hooks it fires keep nothing past the CAM's next call
        with torch.no_grad():
            return tta_probabilities(self.model, x, self.art.tta, self.art.temperature, self.art.multilabel).numpy()


def overlay(image_uint8_chw: torch.Tensor, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB float image in [0, 1] with the heatmap blended over it (jet colour map)."""
    from matplotlib import colormaps
    img = image_uint8_chw.permute(1, 2, 0).numpy().astype(np.float32) / 255
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    colour = colormaps["jet"](heatmap)[..., :3]
    return np.clip((1 - alpha) * img + alpha * colour, 0, 1)


def explanation_figure(image: torch.Tensor, heatmap: np.ndarray, probs: np.ndarray, classes: list[str],
                       title: str = "", k: int = 3, method: str = "gradcam"):
    """The original and the overlay side by side, the top-k classes in the title."""
    from .plots import new_figure
    fig = new_figure(figsize=(7, 3.8))
    axes = fig.subplots(1, 2)
    rgb = image.permute(1, 2, 0).numpy()
    axes[0].imshow(rgb.squeeze(), cmap="gray" if rgb.shape[2] == 1 else None)
    axes[0].set_title("input")
    axes[1].imshow(overlay(image, heatmap))
    axes[1].set_title(method)
    for ax in axes:
        ax.axis("off")
    top = np.argsort(-probs)[:k]
    fig.suptitle((title + "\n" if title else "") + "   ".join(f"{classes[i]} {probs[i]:.2f}" for i in top), fontsize=10)
    fig.tight_layout()
    return fig


def explain_files(art, paths: list[Path], out_dir: Path, method: str = "gradcam", layer: str | None = None,
                  class_name: str | None = None, k: int = 3, batch_size: int = 16, reporter=None) -> list[Path]:
    """One PNG per image: original | overlay, with the top-k classes and probabilities."""
    from .errors import ImageDecodeError
    from .plots import save
    class_index = None
    if class_name is not None:
        if class_name not in art.classes:
            raise UserError(f"unknown class {class_name!r} (classes: {', '.join(art.classes)})")
        class_index = art.classes.index(class_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with Explainer(art, method, layer) as explainer:
        for start in range(0, len(paths), batch_size):
            chunk, images = [], []
            for p in paths[start:start + batch_size]:
                try:
                    images.append(decode_image(p, art.preprocess.channels))
                    chunk.append(p)
                except ImageDecodeError as e:
                    if reporter:
                        reporter.warn(f"skipped unreadable file {p}: {e.reason}")
            if not images:
                continue
            maps, probs, batch = explainer.heatmaps(images, class_index)
            for p, m, pr, img in zip(chunk, maps, probs, batch):
                fig = explanation_figure(img, m, pr, art.classes, Path(p).name, k, method)
                target = out_dir / f"{Path(p).stem}_{method.replace('+', 'p')}.png"
                save(fig, target, 90)
                written.append(target)
    return written


def _grid(n: int, cell: float):
    """A near-square grid of n image axes (frames off), as (Figure, flat array of axes)."""
    from .plots import new_figure
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig = new_figure(figsize=(cols * cell, rows * cell + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, cols)).flatten()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def first_conv(model: nn.Module, name: str | None = None) -> nn.Conv2d:
    if name is not None:
        layer = find_layer(model, name)
        if not isinstance(layer, nn.Conv2d):
            raise UserError(f"layer {name!r} is a {type(layer).__name__}, not a convolution")
        return layer
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise UserError("the model has no convolutional layer")


def filter_grid(model: nn.Module, layer: str | None = None):
    """(filters as an array F x kh x kw x 3|1 scaled to [0, 1], matplotlib Figure of the grid)."""
    conv = first_conv(model, layer)
    w = conv.weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):
        w = w.mean(1, keepdim=True)
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = ((w - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1).numpy()
    n = len(w)
    fig, axes = _grid(n, 0.9)
    for i, ax in enumerate(axes[:n]):
        ax.imshow(w[i].squeeze(), cmap="gray" if w.shape[3] == 1 else None, interpolation="nearest")
    fig.suptitle(f"{n} filters of the first convolution ({w.shape[1]}x{w.shape[2]})", fontsize=9)
    return w, fig


def feature_maps(art, image, layer: str | None = None, limit: int = 64):
    """(activations C x H x W of one image at a layer, Figure of up to `limit` channels)."""
    model = art.model.eval()
    target = find_layer(model, layer, art.arch)
    captured = {}
    handle = target.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o.detach()))
    try:
        pre = art.preprocess
        img = image if hasattr(image, "mode") else decode_image(image, pre.channels)
        with torch.no_grad():
            model(batch_to_input(image_to_uint8(img, pre)[None], pre))
    finally:
        handle.remove()
    maps = captured["out"][0].float().numpy()
    n = min(limit, len(maps))
    fig, axes = _grid(n, 1.1)
    for i, ax in enumerate(axes[:n]):
        ax.imshow(maps[i], cmap="viridis")
    fig.suptitle(f"feature maps ({n} of {len(maps)} channels, {maps.shape[1]}x{maps.shape[2]})", fontsize=9)
    return maps, fig
