"""Image pre-processing: colour order, resize (letterbox/squash/crop), normalization, layout.

Normalization and quantization are fused into one 256-entry lookup table per
channel, so a uint8 frame becomes the model's int8/float tensor in one
``cv2.LUT`` pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import cv2
import numpy as np

from agent.bundle import ImageInput
from agent.errors import BundleError, InputError
from agent.runtime import quant
from agent.runtime.base import TensorInfo

_UINT8 = np.dtype(np.uint8)


@dataclass(frozen=True)
class Transform:
    """Maps model-input pixel coordinates back to the source image: ``src = (model - offset) / scale``."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    src_width: int
    src_height: int

    def to_source(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map (N, 4) x1,y1,x2,y2 boxes to source pixels, clipped to the image."""
        if type(boxes_xyxy) is np.ndarray and boxes_xyxy.dtype == np.float32 and boxes_xyxy.shape[1:] == (4,):
            # the same float32 operations per element as below, in three passes over the array
            offset, scale, high = self._arrays
            out = (boxes_xyxy - offset) / scale
            return np.clip(out, 0, high, out=out)
        out = np.empty_like(boxes_xyxy, dtype=np.float32)
        out[:, 0::2] = (boxes_xyxy[:, 0::2] - self.offset_x) / self.scale_x
        out[:, 1::2] = (boxes_xyxy[:, 1::2] - self.offset_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.src_width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.src_height, out=out[:, 1::2])
        return out

    @functools.cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets, scales and upper bounds per x1,y1,x2,y2 column, float32 (as float32 arithmetic casts them)."""
        offset = np.asarray([self.offset_x, self.offset_y] * 2, dtype=np.float32)
        scale = np.asarray([self.scale_x, self.scale_y] * 2, dtype=np.float32)
        high = np.asarray([self.src_width, self.src_height] * 2, dtype=np.float32)
        return offset, scale, high


def infer_layout(shape: tuple[int | str, ...]) -> str | None:
    """NHWC or NCHW from a rank-4 image tensor shape, None when it is not an image tensor."""
    if len(shape) != 4:
        return None
    last, second = shape[3], shape[1]
    if isinstance(last, int) and last in (1, 3):
        return "NHWC"
    if isinstance(second, int) and second in (1, 3):
        return "NCHW"
    return None


class ImagePreprocessor:
    """Turns a BGR (OpenCV order) or grayscale uint8 frame into the model's input tensor."""

    def __init__(self, spec: ImageInput, tensor: TensorInfo) -> None:
        layout = spec.layout or infer_layout(tensor.shape)
        if layout is None:
            raise BundleError(
                f"input {tensor.name!r} with shape {list(tensor.shape)} is not an image tensor (NHWC or NCHW, 1 or 3 channels)",
                "set [input] kind = 'tensor' or 'timeseries' in bundle.toml",
            )
        shape = tensor.shape
        if len(shape) != 4:
            raise BundleError(
                f"image input {tensor.name!r} has rank {len(shape)}, expected 4", "fix [input] in bundle.toml"
            )
        h, w, c = (shape[1], shape[2], shape[3]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
        if not isinstance(c, int) or c not in (1, 3):
            raise BundleError(
                f"input {tensor.name!r}: {layout} shape {list(shape)} has no 1- or 3-channel axis", "fix [input].layout"
            )
        want_c = 1 if spec.color == "gray" else 3
        if c != want_c:
            raise BundleError(
                f"bundle says colour {spec.color!r} ({want_c} channel(s)) but the model input has {c}",
                "fix [input].color in bundle.toml",
            )
        model_size = (w, h) if isinstance(w, int) and w > 0 and isinstance(h, int) and h > 0 else None
        if spec.size is not None and model_size is not None and tuple(spec.size) != model_size:
            raise BundleError(
                f"bundle says input size {list(spec.size)} (width, height) but the model takes {list(model_size)}",
                "fix [input].size in bundle.toml",
            )
        size = model_size or (tuple(spec.size) if spec.size else None)
        if size is None:
            raise BundleError(f"input {tensor.name!r} has dynamic height/width", "set [input].size = [width, height]")
        self.spec, self.tensor, self.layout, self.channels = spec, tensor, layout, c
        self.width, self.height = size
        mean = _per_channel(spec.mean, c, "mean")
        std = _per_channel(spec.std, c, "std")
        if np.any(std == 0):
            raise BundleError("[input].std contains 0", "use non-zero standard deviations")
        self._mean, self._std = mean, std
        params = tensor.quant if tensor.is_quantized else None
        out_dtype = tensor.dtype if tensor.dtype.kind in "iuf" else np.dtype(np.float32)
        self._lut = quant.uint8_lut(params, out_dtype, mean, std).reshape(1, 256, c)
        self._params = params
        # Fast path for uint8 BGR (or gray) frames: geometry planned once per source size, one LUT
        # pass straight into the model's layout (planar when every channel shares one table).
        tables = self._lut[0]
        self._lut_flat = np.ascontiguousarray(tables[:, 0])  # (256,) the table of channel 0
        self._uniform = all(np.array_equal(tables[:, i], tables[:, 0], equal_nan=True) for i in range(c))
        self._fast_ok = self._lut.dtype in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32))
        self._gray, self._rgb = spec.color == "gray", spec.color == "rgb"
        self._nchw = layout == "NCHW"
        self._out_shape = (1, c, self.height, self.width) if self._nchw else (1, self.height, self.width, c)
        self._plans: dict[tuple[int, ...], _Plan | Literal[False]] = {}
        self._fillers: dict[tuple[int, ...], Callable[[np.ndarray, np.ndarray], Transform] | Literal[False]] = {}
        # every output (any frame) is a C-contiguous array of the tensor's own dtype and shape
        self.exact = self._lut.dtype == tensor.dtype and self._out_shape == tensor.shape

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, Transform]:
        if type(frame) is np.ndarray and frame.dtype == _UINT8:
            plan = self._plans.get(frame.shape)
            if plan is None:
                plan = self._plan(frame.shape)
            if plan:
                return self._fast(frame, plan)
        return self._generic(frame)

    def fill(self, frame: np.ndarray, out: np.ndarray) -> Transform | None:
        """Write the model tensor for ``frame`` into ``out`` (C-contiguous, the tensor's shape and dtype, e.g. the
        runtime's own input buffer): the same values as calling the preprocessor, without allocating the tensor.

        None, leaving ``out`` as it was, when the frame is not a uint8 frame this fast path takes (call the
        preprocessor instead). The steps for each frame size are planned once, into buffers of their own: callers
        serialize calls (the predictor's lock).
        """
        if type(frame) is not np.ndarray or frame.dtype != _UINT8:
            return None
        filler = self._fillers.get(frame.shape)
        if filler is None:
            filler = self._filler(frame.shape)
        return filler(frame, out) if filler else None

    def _filler(self, shape: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], Transform] | Literal[False]:
        """``fill``'s steps for uint8 frames of ``shape``: the usual plans (gray, or BGR/RGB NHWC, resized or not)
        as a few OpenCV calls writing into kept buffers; other plans through ``_fill_planned``."""
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plan(shape)
        if len(self._fillers) >= 32:
            self._fillers.clear()
        filler: Callable[[np.ndarray, np.ndarray], Transform] | Literal[False] = False
        if plan and self.exact:
            filler = functools.partial(self._fill_planned, plan=plan)
            two_d = self.channels == 1
            if plan.border is None and plan.crop is None and (two_d or not self._nchw):
                filler = self._direct_filler(shape, plan)
        self._fillers[shape] = filler
        return filler

    def _direct_filler(self, shape: tuple[int, ...], plan: _Plan) -> Callable[[np.ndarray, np.ndarray], Transform]:
        h, w, c = self.height, self.width, self.channels
        out_shape = (h, w) if c == 1 else (h, w, c)
        lut = self._lut_flat if c == 1 else self._lut
        transform, size, interpolation = plan.transform, plan.size, plan.interpolation
        gray = np.empty(shape[:2], np.uint8) if plan.to_gray else None
        small = np.empty((h, w) if c == 1 or plan.to_gray else (h, w, shape[2]), np.uint8) if size else None
        rgb = np.empty((h, w, 3), np.uint8) if self._rgb else None
        cvt, resize, bgr2gray, bgr2rgb = cv2.cvtColor, cv2.resize, cv2.COLOR_BGR2GRAY, cv2.COLOR_BGR2RGB

        def fill(frame: np.ndarray, out: np.ndarray) -> Transform:
            img = cvt(frame, bgr2gray, gray) if gray is not None else frame
            if small is not None:
                img = resize(img, size, small, 0, 0, interpolation)  # positional: OpenCV parses keywords slowly
            if rgb is not None:
                img = cvt(img, bgr2rgb, rgb)
            _lut_into(img, lut, out.reshape(out_shape))
            return transform

        return fill

    def _fill_planned(self, frame: np.ndarray, out: np.ndarray, plan: _Plan) -> Transform:
        """``plan``'s steps written into ``out``. Colour order is a permutation of channels, so for RGB models it is
        applied after resizing (on fewer pixels), folded into the planar copy for NCHW."""
        img = self._resized(frame, plan)
        h, w, c = self.height, self.width, self.channels
        if img.ndim == 2:
            _lut_into(img, self._lut_flat, out.reshape(h, w))
        elif self._nchw and self._uniform:
            planes = img.transpose(2, 0, 1)
            planes = np.ascontiguousarray(planes[::-1] if self._rgb else planes)
            _lut_into(planes.reshape(c * h, w), self._lut_flat, out.reshape(c * h, w))
        else:
            if self._rgb:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            if self._nchw:
                np.copyto(out.reshape(c, h, w), cv2.LUT(img, self._lut).transpose(2, 0, 1))
            else:
                _lut_into(img, self._lut, out.reshape(h, w, c))
        return plan.transform

    def _resized(self, frame: np.ndarray, plan: _Plan) -> np.ndarray:
        """The colour conversion to gray and the resize/pad/crop steps of ``plan``."""
        img = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if plan.to_gray else frame
        if plan.size is not None:
            img = cv2.resize(img, plan.size, interpolation=plan.interpolation)
            if plan.border is not None:
                top, bottom, left, right = plan.border
                img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=plan.fill)
            elif plan.crop is not None:
                top, left = plan.crop
                img = img[top : top + self.height, left : left + self.width]
        return img

    def _fast(self, frame: np.ndarray, plan: _Plan) -> tuple[np.ndarray, Transform]:
        """uint8 BGR (or, for gray models, gray) frame: same values as ``_generic``, fewer passes (one LUT pass
        into a new tensor of the table's dtype)."""
        out = np.empty(self._out_shape, dtype=self._lut.dtype)
        return out, self._fill_planned(frame, out, plan)

    def _plan(self, shape: tuple[int, ...]) -> _Plan | Literal[False]:
        """For a uint8 frame of ``shape``: the colour, resize/pad/crop steps and box transform (what ``_generic``
        does), or False when ``_generic`` handles such frames (no pixels, 1 or 4 channels, an unusual table)."""
        eligible = self._fast_ok and ((len(shape) == 3 and shape[2] == 3) or (len(shape) == 2 and self._gray))
        if not eligible or not all(shape):
            plan: _Plan | Literal[False] = False
        else:
            plan = self._geometry(shape[1], shape[0], to_gray=self._gray and len(shape) == 3)
        if len(self._plans) >= 32:  # a camera has one frame size; bound the cache for callers that vary it
            self._plans.clear()
        self._plans[shape] = plan
        return plan

    def _geometry(self, src_w: int, src_h: int, to_gray: bool) -> _Plan:
        w, h = self.width, self.height
        mode = self.spec.resize
        interp = cv2.INTER_AREA if src_w > w and src_h > h else cv2.INTER_LINEAR
        fill = [self.spec.letterbox_fill] * (1 if self._gray else 3)
        if (src_w, src_h) == (w, h):
            plan = _Plan(None, interp, None, None, fill, Transform(1.0, 1.0, 0.0, 0.0, src_w, src_h))
        elif mode == "squash":
            plan = _Plan((w, h), interp, None, None, fill, Transform(w / src_w, h / src_h, 0.0, 0.0, src_w, src_h))
        elif mode == "letterbox":
            scale = min(w / src_w, h / src_h)
            nw, nh = max(1, round(src_w * scale)), max(1, round(src_h * scale))
            left, top = (w - nw) // 2, (h - nh) // 2
            border = (top, h - nh - top, left, w - nw - left)
            plan = _Plan(
                (nw, nh), interp, border, None, fill, Transform(scale, scale, float(left), float(top), src_w, src_h)
            )
        else:
            scale = max(w / src_w, h / src_h)
            nw, nh = max(w, round(src_w * scale)), max(h, round(src_h * scale))
            left, top = (nw - w) // 2, (nh - h) // 2
            plan = _Plan(
                (nw, nh),
                interp,
                None,
                (top, left),
                fill,
                Transform(scale, scale, -float(left), -float(top), src_w, src_h),
            )
        return plan._replace(to_gray=to_gray)

    def _generic(self, frame: np.ndarray) -> tuple[np.ndarray, Transform]:
        if not isinstance(frame, np.ndarray) or frame.ndim not in (2, 3) or frame.size == 0:
            raise InputError("image must be a non-empty 2-D (gray) or 3-D (colour) array", "give a decoded image")
        src_h, src_w = frame.shape[:2]
        img = self._convert_color(frame)
        img, transform = self._resize(img, src_w, src_h)
        if img.dtype == np.uint8:
            values = cv2.LUT(img, self._lut if self.channels > 1 else self._lut[..., 0])
        else:
            real = (img.astype(np.float32) - self._mean) / self._std
            values = (
                quant.quantize(real, self._params, self.tensor.dtype)
                if self._params
                else real.astype(self.tensor.dtype)
            )
        if values.ndim == 2:
            values = values[:, :, np.newaxis]
        if self.layout == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values[np.newaxis]), transform

    def _convert_color(self, frame: np.ndarray) -> np.ndarray:
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        if frame.ndim == 3 and frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        if frame.ndim == 3 and frame.shape[2] != 3:
            raise InputError(f"image has {frame.shape[2]} channels", "give a gray, BGR or BGRA image")
        if self.spec.color == "gray":
            return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if self.spec.color == "rgb" else frame

    def _resize(self, img: np.ndarray, src_w: int, src_h: int) -> tuple[np.ndarray, Transform]:
        w, h = self.width, self.height
        mode = self.spec.resize
        if (src_w, src_h) == (w, h):
            return img, Transform(1.0, 1.0, 0.0, 0.0, src_w, src_h)
        interp = cv2.INTER_AREA if src_w > w and src_h > h else cv2.INTER_LINEAR
        if mode == "squash":
            out = cv2.resize(img, (w, h), interpolation=interp)
            return out, Transform(w / src_w, h / src_h, 0.0, 0.0, src_w, src_h)
        if mode == "letterbox":
            scale = min(w / src_w, h / src_h)
            nw, nh = max(1, round(src_w * scale)), max(1, round(src_h * scale))
            resized = cv2.resize(img, (nw, nh), interpolation=interp)
            left, top = (w - nw) // 2, (h - nh) // 2
            fill = [self.spec.letterbox_fill] * (1 if img.ndim == 2 else img.shape[2])
            out = cv2.copyMakeBorder(resized, top, h - nh - top, left, w - nw - left, cv2.BORDER_CONSTANT, value=fill)
            return out, Transform(scale, scale, float(left), float(top), src_w, src_h)
        scale = max(w / src_w, h / src_h)  # crop: fill the input, cut the overhang evenly
        nw, nh = max(w, round(src_w * scale)), max(h, round(src_h * scale))
        resized = cv2.resize(img, (nw, nh), interpolation=interp)
        left, top = (nw - w) // 2, (nh - h) // 2
        out = resized[top : top + h, left : left + w]
        return out, Transform(scale, scale, -float(left), -float(top), src_w, src_h)


class _Plan(NamedTuple):
    size: tuple[int, int] | None  # resize to (width, height); None: the frame has the model's size
    interpolation: int
    border: tuple[int, int, int, int] | None  # letterbox: top, bottom, left, right
    crop: tuple[int, int] | None  # crop: top, left
    fill: list[int]
    transform: Transform
    to_gray: bool = False  # BGR frame for a gray model


def _lut_into(img: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``cv2.LUT`` written into ``out`` (a view of the destination); copied when OpenCV chose another buffer."""
    written = cv2.LUT(img, table, out)  # positional: a keyword costs OpenCV's binding 0.2-0.3 us a call
    if written is not out:
        np.copyto(out, written.reshape(out.shape))


def _per_channel(values: list[float], channels: int, key: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise BundleError(
            f"[input].{key} has {len(values)} values for {channels} channels", f"give 1 or {channels} values"
        )
    return np.asarray(values, dtype=np.float32)
