"""Pictures of where FlashSloth looks: SAP's window weights and EmbQ's visual attention.

    from tokencompress.viz import draw_sap_weights, draw_embq_attention
    tokens, weights = sap(features, grid, return_weights=True)        # weights (1, H*W)
    draw_sap_weights(image, weights[0], grid, "sap.png")
    update, attention = embq(queries, text, features, return_attention=True)  # (1, n, H*W)
    draw_embq_attention(image, attention[0], grid, "embq.png")

As in the paper's Figure 4a, each picture is a heat map over the input image. Token
(r, c) of an H x W grid covers the pixels of row band r and column band c of the image
(the vision encoder sees the image squashed to a square, so a token covers an equal
share of the image whatever its aspect ratio); the heat map is constant over those
pixels (no smoothing), so it shows exactly the values per token. A picture has the
image's size; one panel per query puts the panels side by side in rows.

Whole models: `capture_attention_maps(model)` records, while the model runs, the weights
of every `SAP` and the visual attention of every `EmbQ` in it (see its docstring for
what it needs), and `draw_attention_maps` draws both pictures;
`draw_model_attention(model, inputs, image, out_dir)` does the three steps.

Needs the `viz` extra (matplotlib for the colour maps, pillow for the images); both are
imported only when a picture is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from .base import Grid, as_grid
from .embq import EmbQ
from .sap import SAP

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "AttentionMaps",
    "sap_weight_map",
    "embq_attention_map",
    "upsample_token_map",
    "overlay_heat_map",
    "draw_sap_weights",
    "draw_embq_attention",
    "attention_maps_from_modules",
    "capture_attention_maps",
    "draw_attention_maps",
    "draw_model_attention",
]

ImageLike = Any  # a PIL image, an (h, w, 3) / (h, w) array, or a (3, h, w) tensor
QueryReduction = Literal["mean", "each"]


# -- token values on the grid ----------------------------------------------------------------
def _as_tensor(values: Any, name: str) -> torch.Tensor:
    if not isinstance(values, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")
    return torch.as_tensor(values).detach().to("cpu", torch.float32)


def sap_weight_map(weights: Any, grid: Grid) -> torch.Tensor:
    """SAP's per-token weights of one image as an (H, W) float32 map.

    Args:
        weights: (H*W,) or (1, H*W): what `SAP(..., return_weights=True)` returns for one
            image (each token's softmax weight within its window).
        grid: (H, W), the grid SAP ran on.
    """
    height, width = as_grid(grid)
    values = _as_tensor(weights, "weights")
    if values.dim() == 2 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 1:
        raise ValueError(
            f"weights must be (H*W,) or (1, H*W) for one image, got shape {tuple(values.shape)}; "
            "for a batch, draw one image at a time (weights[i])"
        )
    if values.numel() != height * width:
        raise ValueError(
            f"weights has {values.numel()} tokens but grid={(height, width)} holds {height * width}; "
            "pass the grid SAP ran on"
        )
    return values.reshape(height, width)


def embq_attention_map(attention: Any, grid: Grid, reduce: QueryReduction = "mean") -> torch.Tensor:
    """EmbQ's visual attention of one query block as maps over the grid.

    Args:
        attention: (n, V) or (1, n, V) with V = H*W: what `EmbQ(..., return_attention=True)`
            returns for one sample (averaged over heads). With several images per sample
            (FlashSloth-HD: 5 x 729), pass one image's columns.
        grid: (H, W) of the vision features EmbQ read.
        reduce: "mean" over the queries -> (H, W); "each" query -> (n, H, W).
    """
    height, width = as_grid(grid)
    values = _as_tensor(attention, "attention")
    if values.dim() == 3 and values.shape[0] == 1:
        values = values[0]
    if values.dim() != 2 or values.shape[0] == 0:
        raise ValueError(
            f"attention must be (n, V) or (1, n, V) with n >= 1 queries, got shape {tuple(values.shape)}; "
            "for a batch, draw one sample at a time (attention[i])"
        )
    if values.shape[1] != height * width:
        hint = ""
        if values.shape[1] % (height * width) == 0:
            hint = (
                f" (it holds {values.shape[1] // (height * width)} images' tokens: pass one image's "
                f"columns, attention[:, i * {height * width}:(i + 1) * {height * width}])"
            )
        raise ValueError(
            f"attention has V={values.shape[1]} vision tokens but grid={(height, width)} holds "
            f"{height * width}{hint}"
        )
    if reduce == "mean":
        return values.mean(dim=0).reshape(height, width)
    if reduce == "each":
        return values.reshape(-1, height, width)
    raise ValueError(f"reduce must be 'mean' or 'each', got {reduce!r}")


# -- pixels ---------------------------------------------------------------------------------
def upsample_token_map(token_map: Any, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map of token values -> a (height, width) map of pixel values.

    `size` is (width, height), as PIL gives it. Pixel (y, x) takes the value of the token
    that covers it, row floor(y * H / height) and column floor(x * W / width): nearest
    neighbour, so the picture shows each token's own value.
    """
    values = _as_tensor(token_map, "token_map").numpy()
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"token_map must be (H, W), got shape {values.shape}")
    width, height = size
    if min(width, height) < 1:
        raise ValueError(f"size must be (width, height) of at least one pixel, got {size}")
    rows = np.arange(height) * values.shape[0] // height
    cols = np.arange(width) * values.shape[1] // width
    return values[rows[:, None], cols[None, :]]


def _as_rgb(image: ImageLike) -> np.ndarray:
    """The image as an (h, w, 3) uint8 array."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow comes with the viz extra
        raise ImportError("tokencompress.viz needs pillow: pip install 'tokencompress[viz]'") from error
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be (3, h, w) or (1, h, w), got shape {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"an image array must be (h, w), (h, w, 1) or (h, w, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        # Floats are taken as [0, 1], as matplotlib's imshow does.
        image = np.clip(np.asarray(image, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def overlay_heat_map(
    image: ImageLike, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet", vmax: float | None = None
) -> np.ndarray:
    """Blend a colour-mapped (h, w) heat map over the image -> (h, w, 3) uint8.

    Colours run from 0 to `vmax` (default: the map's maximum), so the strongest token is
    the top colour of `cmap` in every picture.
    """
    from matplotlib import colormaps

    rgb = _as_rgb(image)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat has shape {heat.shape}, expected the image's (h, w) = {rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    top = float(heat.max()) if vmax is None else float(vmax)
    scaled = heat / top if top > 0 else np.zeros_like(heat)
    colours = colormaps[cmap](np.clip(scaled, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1.0 - alpha) * rgb + alpha * colours + 0.5, 0, 255).astype(np.uint8)


def _band_edges(cells: int, pixels: int, step: int) -> list[int]:
    """Pixel offsets of the borders between bands of `step` cells out of `cells` (inner ones)."""
    return [boundary * pixels // cells for boundary in range(step, cells, step)]


def _draw_window_borders(pixels: np.ndarray, grid: Grid, window: int, colour: tuple[int, int, int]) -> None:
    """Draw the borders between SAP's windows in place, about 1/200 of the image thick."""
    height, width = pixels.shape[:2]
    thickness = max(1, round(min(height, width) / 200))
    for y in _band_edges(grid[0], height, window):
        pixels[max(0, y - thickness // 2): y - thickness // 2 + thickness, :] = colour
    for x in _band_edges(grid[1], width, window):
        pixels[:, max(0, x - thickness // 2): x - thickness // 2 + thickness] = colour


def _picture(pixels: np.ndarray) -> "PILImage":
    from PIL import Image

    return Image.fromarray(pixels)


def _save(picture: "PILImage", path: str | Path | None) -> "PILImage":
    """Write `picture` as a PNG to `path` (its folder made if needed), unless None."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    return picture


# -- pictures -------------------------------------------------------------------------------
def draw_sap_weights(
    image: ImageLike,
    weights: Any,
    grid: Grid,
    path: str | Path | None,
    *,
    window: int = 3,
    alpha: float = 0.5,
    cmap: str = "jet",
    border_colour: tuple[int, int, int] = (255, 255, 255),
) -> "PILImage":
    """SAP's weights of one image as a heat map over it, with the windows' borders.

    Weights sum to 1 within each window, so the picture says which tokens each window
    keeps; colours run from 0 to the largest weight. Writes a PNG of the image's size to
    `path` (unless None) and returns the picture.

    Args:
        image: the input image (a PIL image, an (h, w, 3) array, a (3, h, w) tensor in [0, 1]).
        weights: (H*W,) or (1, H*W), from `SAP(..., return_weights=True)`.
        grid: (H, W), the grid SAP ran on.
        window: SAP's window side, for the borders (FlashSloth: 3).
    """
    token_map = sap_weight_map(weights, grid)
    rgb = _as_rgb(image)
    heat = upsample_token_map(token_map, (rgb.shape[1], rgb.shape[0]))
    pixels = overlay_heat_map(rgb, heat, alpha=alpha, cmap=cmap)
    _draw_window_borders(pixels, as_grid(grid), window, border_colour)
    return _save(_picture(pixels), path)


def draw_embq_attention(
    image: ImageLike,
    attention: Any,
    grid: Grid,
    path: str | Path | None,
    *,
    reduce: QueryReduction = "mean",
    columns: int | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> "PILImage":
    """EmbQ's visual attention of one query block as a heat map over the image.

    `reduce="mean"`: one panel, averaged over the queries. `reduce="each"`: one panel per
    query, labelled, `columns` per row (default ceil(sqrt(n)): 9 queries -> 3 x 3); each
    panel's colours run from 0 to its own largest weight. Writes a PNG (panels of the
    image's size, no gaps) to `path` (unless None) and returns the picture.

    Args:
        image: the input image (a PIL image, an (h, w, 3) array, a (3, h, w) tensor in [0, 1]).
        attention: (n, V) or (1, n, V), from `EmbQ(..., return_attention=True)`, V = H*W.
        grid: (H, W) of the vision features EmbQ read.
    """
    maps = embq_attention_map(attention, grid, reduce=reduce)
    rgb = _as_rgb(image)
    size = (rgb.shape[1], rgb.shape[0])
    if reduce == "mean":
        return _save(_picture(overlay_heat_map(rgb, upsample_token_map(maps, size), alpha=alpha, cmap=cmap)), path)
    columns = columns or math.ceil(math.sqrt(len(maps)))
    panels = [overlay_heat_map(rgb, upsample_token_map(one, size), alpha=alpha, cmap=cmap) for one in maps]
    picture = _picture(_tile(panels, columns))
    _label_panels(picture, len(panels), columns, size)
    return _save(picture, path)


def _tile(panels: list[np.ndarray], columns: int) -> np.ndarray:
    """Equal-sized panels in rows of `columns`, row-major; empty cells stay black."""
    if columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    height, width = panels[0].shape[:2]
    rows = math.ceil(len(panels) / columns)
    out = np.zeros((rows * height, min(columns, len(panels)) * width, 3), dtype=np.uint8)
    for index, panel in enumerate(panels):
        row, col = divmod(index, columns)
        out[row * height:(row + 1) * height, col * width:(col + 1) * width] = panel
    return out


def _label_panels(picture: "PILImage", count: int, columns: int, size: tuple[int, int]) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(picture)
    for index in range(count):
        row, col = divmod(index, columns)
        x, y = col * size[0] + 3, row * size[1] + 2
        draw.text((x + 1, y + 1), f"query {index}", fill=(0, 0, 0))  # shadow: readable on any colour
        draw.text((x, y), f"query {index}", fill=(255, 255, 255))


# -- whole models ---------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """SAP weights and EmbQ attention recorded from one run, ready to draw.

    Attributes:
        sap_weights: one (H*W,) tensor per image, in the order SAP saw them.
        sap_grids: the grid of each entry of `sap_weights`.
        window: SAP's window side (for the borders), or None if no SAP ran.
        embq_attention: one (n, V) tensor per query block, in batch order; V is the
            vision tokens of the block's sample (images one after another, each H*W).
    """

    sap_weights: list[torch.Tensor] = field(default_factory=list)
    sap_grids: list[Grid] = field(default_factory=list)
    window: int | None = None
    embq_attention: list[torch.Tensor] = field(default_factory=list)

    def add_sap(self, weights: torch.Tensor, grid: Grid, window: int) -> None:
        """Record the (num_images, H*W) weights of one SAP call."""
        for row in weights.detach().to("cpu", torch.float32):
            self.sap_weights.append(row)
            self.sap_grids.append(as_grid(grid))
        self.window = window

    def add_embq(self, attention: torch.Tensor) -> None:
        """Record the (B, n, V) or (n, V) attention of one EmbQ call."""
        attention = attention.detach().to("cpu", torch.float32)
        self.embq_attention.extend(attention if attention.dim() == 3 else [attention])


def attention_maps_from_modules(
    sap: SAP | None,
    embq: EmbQ | None,
    vision: torch.Tensor,
    *,
    grid: Grid | None = None,
    queries: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
) -> AttentionMaps:
    """Run a plain SAP and/or EmbQ on features and keep what the pictures need.

    Args:
        sap: a `SAP`, or None.
        embq: an `EmbQ`, or None; then `queries` (B, n, text_dim) and `text`
            (B, T, text_dim) are needed (hidden states of the query tokens and of the
            question).
        vision: (B, H*W, vision_dim) raw vision features, read by both.
        grid: (H, W); None for a square grid.
    """
    maps = AttentionMaps()
    with torch.no_grad():
        if sap is not None:
            _, weights = sap(vision, grid, return_weights=True)
            maps.add_sap(weights, grid or _square_grid(vision.shape[1]), sap.window)
        if embq is not None:
            if queries is None or text is None:
                raise ValueError("EmbQ needs queries (B, n, text_dim) and text (B, T, text_dim)")
            _, attention = embq(queries, text, vision, text_mask=text_mask, return_attention=True)
            maps.add_embq(attention)
    return maps


def _square_grid(num_tokens: int) -> Grid:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(H, W)")
    return side, side


def _asking_hooks(module: nn.Module, flag: str, position: int, record: Any) -> list[Any]:
    """Hooks that call `module` with `flag=True`, pass its extra output to `record(output,
    args, kwargs)`, and hand the caller only what it asked for (so the model runs as usual).

    `position` is the flag's index among forward's positional arguments.
    """
    asked: list[bool] = []  # what each call in flight asked for (a stack: calls may nest)

    def ask(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) > position:
            kwargs[flag] = args[position]
            args = args[:position] + args[position + 1:]
        asked.append(bool(kwargs.get(flag, False)))
        kwargs[flag] = True
        return args, kwargs

    def answer(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        caller_asked = asked.pop()
        if output is None:  # the call raised (always_call): nothing to record
            return None
        record(output, args, kwargs)
        return output if caller_asked else output[0]

    return [
        module.register_forward_pre_hook(ask, with_kwargs=True),
        module.register_forward_hook(answer, with_kwargs=True, always_call=True),
    ]


def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def _sap_recorder(module: SAP, maps: AttentionMaps) -> Any:
    def record(output: tuple, args: tuple, kwargs: dict) -> None:
        grid = _argument(args, kwargs, "grid", 1)
        x = _argument(args, kwargs, "x", 0)
        maps.add_sap(output[1], grid if grid is not None else _square_grid(x.shape[1]), module.window)

    return record


def _embq_layer_hook(layer: nn.Module, call_key: str, maps: AttentionMaps) -> Any:
    """A pre-hook on the EmbQ graft's decoder layer: recompute each block's attention.

    The graft runs EmbQ's packed entry point, which does not return attention; the
    layer's call carries everything EmbQ reads (`EmbQCall`: the query blocks, their
    instruction tokens, the raw vision features per sample), so each block is run again
    through the padded entry point with `return_attention=True`.
    """
    embq: EmbQ = layer.embq

    def hook(_layer: nn.Module, args: tuple, kwargs: dict) -> None:
        call = kwargs.get(call_key)
        if call is None:
            return  # a decoding step, or a prompt without query blocks
        hidden = _argument(args, kwargs, "hidden_states", 0)
        plan = call.plan
        dtype = next(embq.parameters()).dtype
        with torch.no_grad():
            for block in range(plan.num_blocks):
                row = int(plan.query_rows[block, 0])
                queries = hidden[row, plan.query_positions[block]]
                start, end = plan.cu_seqlens_text[block], plan.cu_seqlens_text[block + 1]
                text = hidden[plan.text_rows[start:end], plan.text_positions[start:end]]
                vision = call.vision[call.cu_seqlens_vision[row]:call.cu_seqlens_vision[row + 1]]
                # forward(), not __call__: this run is for the picture, not part of the
                # model's, so no hook (ours included) should see it.
                _, attention = embq.forward(
                    queries[None].to(dtype), text[None].to(dtype),
                    vision[None].to(device=hidden.device, dtype=dtype), return_attention=True,
                )
                maps.add_embq(attention[0])

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def _embq_graft_layer_type() -> tuple[type | None, str]:
    """The EmbQ graft's decoder-layer wrapper and the keyword its call comes in, if installed."""
    try:
        from tokencompress.adapters._embq_layers import CALL_KEY, EmbQDecoderLayer
    except ImportError:
        return None, ""
    return EmbQDecoderLayer, CALL_KEY


@contextmanager
def capture_attention_maps(model: nn.Module) -> Iterator[AttentionMaps]:
    """Record SAP weights and EmbQ attention while `model` runs inside the block.

        with capture_attention_maps(model) as maps:
            model(**inputs)
        draw_attention_maps(image, maps, "pictures/")

    What it needs from the model, found in `model.modules()`:
    - every `SAP` is called through `__call__` (`sap(x, grid)`), as a compressor graft
      and `Compose` do; a forward hook asks it for its weights and hands the caller the
      tokens alone, so the model's outputs do not change;
    - every `EmbQ` called through `__call__` (the padded entry point) is asked for its
      attention the same way;
    - an EmbQ grafted with `tokencompress.adapters.graft_embq` runs its packed entry
      point; a pre-hook on the grafted decoder layer runs each query block again through
      the padded one (one extra EmbQ per block, on prefill only).
    Hooks are removed when the block ends, also on errors.
    """
    maps = AttentionMaps()
    handles: list[Any] = []
    graft_layer, call_key = _embq_graft_layer_type()
    try:
        for module in model.modules():
            if isinstance(module, SAP):
                handles += _asking_hooks(module, "return_weights", 2, _sap_recorder(module, maps))
            elif isinstance(module, EmbQ):
                handles += _asking_hooks(module, "return_attention", 5, lambda out, *_: maps.add_embq(out[1]))
            elif graft_layer is not None and isinstance(module, graft_layer):
                handles.append(_embq_layer_hook(module, call_key, maps))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def draw_attention_maps(
    image: ImageLike,
    maps: AttentionMaps,
    out_dir: str | Path,
    *,
    sap_image: int = 0,
    embq_block: int = 0,
    embq_image: int = 0,
    grid: Grid | None = None,
    reduce: QueryReduction = "mean",
    prefix: str = "",
) -> dict[str, Path]:
    """Draw the recorded SAP weights and EmbQ attention over `image`.

    Writes `{prefix}sap_weights.png` (the weights of image `sap_image`, counted in the
    order SAP saw the images: over the whole batch) and `{prefix}embq_attention.png` (query
    block `embq_block`'s attention over the columns of image `embq_image` of that
    block's sample) to `out_dir`, each only if recorded, and returns their paths by name
    ("sap", "embq"). The defaults fit one sample with one image and one question. With
    FlashSloth-HD's views [thumbnail, TL, TR, BL, BR], image 0 is the thumbnail: the
    whole image. EmbQ's vision grid is `grid`, else the grid SAP ran on, else the square
    grid of one image's tokens (a single image per sample).
    """
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if maps.sap_weights:
        if not 0 <= sap_image < len(maps.sap_weights):
            raise ValueError(f"sap_image={sap_image}, but SAP saw {len(maps.sap_weights)} image(s)")
        path = out_dir / f"{prefix}sap_weights.png"
        draw_sap_weights(
            image, maps.sap_weights[sap_image], maps.sap_grids[sap_image], path, window=maps.window or 1
        )
        written["sap"] = path
    if maps.embq_attention:
        if not 0 <= embq_block < len(maps.embq_attention):
            raise ValueError(f"embq_block={embq_block}, but EmbQ ran {len(maps.embq_attention)} query block(s)")
        attention = maps.embq_attention[embq_block]
        if grid is None:
            # EmbQ reads the raw features on the vision grid, the grid SAP runs on.
            grid = maps.sap_grids[0] if maps.sap_grids else _square_grid(attention.shape[1])
        grid = as_grid(grid)
        tokens = grid[0] * grid[1]
        images = attention.shape[1] // tokens
        if attention.shape[1] % tokens or not 0 <= embq_image < images:
            raise ValueError(
                f"query block {embq_block} read {attention.shape[1]} vision tokens: {images} image(s) "
                f"of grid {grid}, so there is no embq_image={embq_image}"
            )
        columns = attention[:, embq_image * tokens:(embq_image + 1) * tokens]
        path = out_dir / f"{prefix}embq_attention.png"
        draw_embq_attention(image, columns, grid, path, reduce=reduce)
        written["embq"] = path
    return written


def draw_model_attention(
    model: nn.Module,
    inputs: Mapping[str, Any],
    image: ImageLike,
    out_dir: str | Path,
    **draw_options: Any,
) -> dict[str, Path]:
    """Run `model(**inputs)` once (no grad) and draw its SAP and EmbQ pictures over `image`.

    `inputs` are the model's inputs for the image and the question (for a grafted LLaVA:
    `pixel_values` and the batch of `tokencompress.adapters.pad_prompts`); `image` is the
    picture to draw on. Options go to `draw_attention_maps`. Raises if the model has
    neither SAP nor EmbQ.
    """
    with capture_attention_maps(model) as maps, torch.no_grad():
        model(**inputs)
    if not maps.sap_weights and not maps.embq_attention:
        raise ValueError("the model ran no SAP and no EmbQ: nothing to draw")
    return draw_attention_maps(image, maps, out_dir, **draw_options)
