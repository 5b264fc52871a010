"""Validation of image requests against the selected model's catalog entry.

Status codes (the spec's mapping, documented in the OpenAPI description):
- 422 request validation: malformed JSON or not an object, a missing/empty `prompt` or
  `model`, wrong types, unknown fields, legacy top-level `width`/`height`, a `size`
  outside the preset table or outside the model's allowed presets, an input image whose
  decoded dimensions are not an allowed preset (strict mode: images are never resized).
- 400 valid JSON, invalid for the model or endpoint: unknown model, the retired
  `remove_bg` field, prompt or negative prompt too long, negative prompt on a model
  without one, steps/guidance out of the model's range or a changed fixed guidance,
  input image count outside the model's min/max, input image data that is not base64,
  not a PNG/JPEG/WebP image, truncated, or larger than 8192 px on an axis,
  `output_quality` with a png `output_format` (PNG is lossless).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from remotegpu_base.catalog import ALL_SIZES, MAX_INPUT_IMAGE_SIDE, ImageModel

from remotegpu_gateway.errors import ApiError, pydantic_errors
from remotegpu_gateway.schemas import ImageRequest

# Decompression-bomb guard: Pillow refuses headers far beyond this before decoding.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_IMAGE_SIDE * MAX_INPUT_IMAGE_SIDE
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Data URL media types -> the Pillow format the data must have.
_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
_UNDECLARED = ("", "application/octet-stream")  # no type, or "some file" (browsers' unknown)
LEGACY_FIELDS = ("width", "height")
RETIRED_FIELDS = ("remove_bg",)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise ApiError(422, "request body is empty; send a JSON object", "body")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise ApiError(422, "request body must be a JSON object", "body")
    return body


def check_request(body: dict[str, Any]) -> ImageRequest:
    """Stage 1, model-independent (422s), then the retired field (400)."""
    legacy = [f for f in LEGACY_FIELDS if f in body]
    if legacy:
        items = [
            {"field": f, "message": 'legacy top-level field; send size: {"width": W, "height": H}'}
            for f in legacy
        ]
        raise ApiError(
            422,
            f'legacy top-level {" and ".join(legacy)} are not accepted; send size: {{"width": W, "height": H}}',
            legacy[0],
            items,
        )
    retired = [f for f in RETIRED_FIELDS if f in body]
    rest = {k: v for k, v in body.items() if k not in RETIRED_FIELDS}
    try:
        req = ImageRequest.model_validate(rest)
    except ValidationError as e:
        raise pydantic_errors([dict(err) for err in e.errors()]) from None
    if req.size is not None and f"{req.size.width}x{req.size.height}" not in ALL_SIZES:
        raise ApiError(
            422,
            f"size {req.size.width}x{req.size.height} is not a supported size preset; presets: {', '.join(ALL_SIZES)}",
            "size",
        )
    if retired:
        raise ApiError(400, f"{retired[0]} is a retired field and is no longer accepted", retired[0])
    return req


def check_for_model(req: ImageRequest, entry: ImageModel) -> dict[str, Any]:
    """Stage 2: the model's limits (422 for size, 400 otherwise). Returns the resolved request."""
    p = entry.spec.parameters
    model = entry.spec.model
    if req.size is not None:
        name = f"{req.size.width}x{req.size.height}"
        if name not in p.size.allowed:
            raise ApiError(
                422, f"size {name} is not supported by {model}; allowed: {', '.join(p.size.allowed)}", "size"
            )
        width, height = req.size.width, req.size.height
    else:
        width, height = p.size.default.width, p.size.default.height
    if len(req.prompt) > p.prompt.max_length:
        raise ApiError(
            400,
            f"prompt is {len(req.prompt)} characters; {model} accepts at most {p.prompt.max_length}",
            "prompt",
        )
    if req.negative_prompt is not None:
        if not p.negative_prompt.supported:
            raise ApiError(
                400, f"{model} does not support negative_prompt; omit the field", "negative_prompt"
            )
        if len(req.negative_prompt) > p.negative_prompt.max_length:
            raise ApiError(
                400,
                f"negative_prompt is {len(req.negative_prompt)} characters; {model} accepts at most "
                f"{p.negative_prompt.max_length}",
                "negative_prompt",
            )
    steps = p.steps.default if req.steps is None else req.steps
    if not p.steps.min <= steps <= p.steps.max:
        raise ApiError(400, f"steps must be between {p.steps.min} and {p.steps.max} for {model}", "steps")
    guidance = p.guidance.default if req.guidance is None else float(req.guidance)
    if p.guidance.fixed and guidance != p.guidance.default:
        raise ApiError(
            400, f"guidance is fixed at {p.guidance.default} for {model}; omit the field", "guidance"
        )
    if not p.guidance.min <= guidance <= p.guidance.max:
        raise ApiError(
            400, f"guidance must be between {p.guidance.min} and {p.guidance.max} for {model}", "guidance"
        )
    images = req.input_images_base64 or []
    lo, hi = p.input_images.min, p.input_images.max
    if not lo <= len(images) <= hi:
        want = f"exactly {lo}" if lo == hi else f"between {lo} and {hi}"
        raise ApiError(
            400,
            f"{model} takes {want} input images; got {len(images)}",
            "input_images_base64",
        )
    output_format = req.output_format or "png"
    if output_format == "png" and req.output_quality is not None:
        raise ApiError(
            400, "output_quality applies to jpeg and webp; PNG is lossless, omit it", "output_quality"
        )
    return {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "seed": req.seed if req.seed is not None else secrets.randbelow(2**32),
        "output_format": output_format,
        "output_quality": req.output_quality,
    }


def decode_image(item: str, index: int, allowed: list[str]) -> bytes:
    """Stage 3 (run in a worker thread): one input image -> its raw file bytes."""
    field = f"input_images_base64[{index}]"
    declared, payload = split_data_url(item, field)
    raw = decode_base64(payload, field)
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as im:
            if declared is not None and im.format != declared:
                raise ApiError(
                    400,
                    f"the data URL declares a {declared} image, but the data is a {im.format} image",
                    field,
                )
            width, height = im.size  # from the header; nothing decoded yet
            if width > MAX_INPUT_IMAGE_SIDE or height > MAX_INPUT_IMAGE_SIDE:
                raise ApiError(
                    400,
                    f"input image is {width}x{height}; at most {MAX_INPUT_IMAGE_SIDE} px per axis",
                    field,
                )
            name = f"{width}x{height}"
            if name not in ALL_SIZES:
                raise ApiError(
                    422,
                    f"input image is {name}, not a supported size preset; resize and crop it to one of: "
                    f"{', '.join(allowed)}",
                    field,
                )
            if name not in allowed:
                raise ApiError(
                    422, f"input image is {name}, not a size this model supports: {', '.join(allowed)}", field
                )
            im.load()  # bounded by the preset sizes (at most 2048x2048)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(400, f"input image is larger than {MAX_INPUT_IMAGE_SIDE} px per axis", field) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        # Pillow's messages name its internals (file objects and their addresses).
        raise ApiError(
            400, "input image does not decode to a PNG, JPEG or WebP image (or is truncated)", field
        ) from None
    return raw


def split_data_url(item: str, field: str) -> tuple[str | None, str]:
    """Raw base64 -> (None, item); a data URL -> (the image format its media type declares,
    or None if it declares none, the base64 payload). Accepts what browsers and common
    clients produce: any case (`DATA:image/PNG;...`) and extra parameters
    (`data:image/png;name=a.png;base64,...`)."""
    if item[:5].lower() != "data:":
        return None, item
    header, comma, payload = item.partition(",")
    media_type, *params = (p.strip().lower() for p in header[5:].split(";"))
    if not comma or not params or params[-1] != "base64":
        raise ApiError(400, "data URL must be base64: data:image/png;base64,<data>", field)
    if media_type in _UNDECLARED:
        return None, payload
    if media_type not in _MEDIA_TYPES:
        raise ApiError(400, f"the data URL declares {media_type}; send a PNG, JPEG or WebP image", field)
    return _MEDIA_TYPES[media_type], payload


def decode_base64(payload: str, field: str) -> bytes:
    """Standard base64; whitespace and missing padding are tolerated."""
    payload = "".join(payload.split())
    payload += "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "input image is not valid base64", field) from None
    if not raw:
        raise ApiError(400, "input image is empty", field)
    return raw


def decode_images(items: list[str], allowed: list[str]) -> list[bytes]:
    return [decode_image(item, i, allowed) for i, item in enumerate(items)]
