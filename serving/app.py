"""The FastAPI application: `GET /` (upload page), `POST /predict`, `GET /health`, `GET /model`.

Bad input is a 4xx with a message, never a 5xx: empty bodies (400), uploads over the byte limit or
images over the pixel limit (413), wrong content types and non-images (415), truncated images (422).
The client's file name is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from datamodules.images import ImageDecodeError, image_size_of
from serving.model import Predictor

ACCEPTED_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/bmp", "image/x-ms-bmp", "image/tiff",
                  "application/octet-stream"}


@dataclass
class Limits:
    """Upload limits.

    Attributes:
        max_bytes: largest accepted upload.
        max_pixels: largest accepted width x height (checked from the header, before decoding).
    """

    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 60_000_000


class Prediction(BaseModel):
    class_: str = Field(alias="class", description="the predicted class")
    class_index: int
    probabilities: dict[str, float] = Field(description="probability of each class")
    heatmap_png: str | None = Field(None, description="Grad-CAM overlay, base64 PNG (with ?heatmap=true)")
    heatmap_error: str | None = None
    model: str


class Health(BaseModel):
    status: str
    model: str


class Problem(BaseModel):
    detail: str


ERRORS = {400: {"model": Problem}, 413: {"model": Problem}, 415: {"model": Problem}, 422: {"model": Problem}}


def create_app(predictor: Predictor, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    info = predictor.describe()
    app = FastAPI(
        title="medsel model server",
        description=f"Serves {info['name']} ({', '.join(info['classes'])}). A research tool, not a medical device: "
                    "its output must not be used for diagnosis.",
        version="0.1.0",
    )
    page = files("serving").joinpath("page.html").read_text()

    @app.middleware("http")
    async def reject_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload is larger than the limit of {limits.max_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", model=str(info["name"]))

    @app.get("/model", response_model=dict[str, Any])
    def model() -> dict[str, Any]:
        return info

    @app.post("/predict", response_model=Prediction, response_model_by_alias=True, responses=ERRORS)
    def predict(
        file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, BMP or TIFF)")],
        heatmap: Annotated[bool, Query(description="also return a Grad-CAM overlay")] = False,
    ) -> Prediction:
        ctype = (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise HTTPException(415, f"unsupported content type '{ctype}'; send a PNG, JPEG, BMP or TIFF image")
        data = file.file.read(limits.max_bytes + 1)
        if len(data) == 0:
            raise HTTPException(400, "the uploaded file is empty")
        if len(data) > limits.max_bytes:
            raise HTTPException(413, f"upload is larger than the limit of {limits.max_bytes} bytes")
        try:
            width, height, _ = image_size_of(data)
        except ImageDecodeError as e:
            raise HTTPException(415, f"not an image this server can read: {e}") from None
        if width * height > limits.max_pixels:
            raise HTTPException(413, f"image has {width}x{height} pixels, over the limit of {limits.max_pixels}")
        try:
            image = predictor.preprocess(data)
        except ImageDecodeError as e:
            raise HTTPException(422, f"the image could not be decoded: {e}") from None
        result = predictor.predict(image, heatmap)
        return Prediction(**result, model=str(info["name"]))

    return app
