"""The FastAPI application: `GET /` (upload page), `POST /predict`, `GET /health`, `GET /model`, and the API
docs at `/docs` and `/redoc`, whose scripts are served from the `fastapi-offline` package (no CDN).

Bad input is a 4xx with a message, never a 5xx: empty bodies (400), uploads over the byte limit or
images over the pixel limit (413), anything but PNG/JPEG/BMP/TIFF/DICOM by content (415), truncated images (422).
The client's file name and content type are never used.
"""

from __future__ import annotations

import threading
from importlib.resources import files
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from datamodules.images import ImageDecodeError
from serving.images import TooManyPixels, UnsupportedImage
from serving.limits import BodyLimit, Limits

if TYPE_CHECKING:  # the ONNX back end serves without torch: the torch back end is imported only by its users
    from serving.model import Predictor
    from serving.onnx_backend import OnnxPredictor

__all__ = ["Limits", "create_app"]


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


def create_app(predictor: Predictor | OnnxPredictor, limits: Limits | None = None) -> FastAPI:
    """The server's application around a loaded model.

    Args:
        predictor: the model and its preprocessing (torch, or an ONNX export run by ONNX Runtime).
        limits: upload limits (defaults: see serving.limits).
    """
    limits = limits or Limits()
    info = predictor.describe()
    app = FastAPIOffline(
        title="medsel model server",
        description=f"Serves {info['name']} ({', '.join(info['classes'])}). A research tool, not a medical device: "
                    "its output must not be used for diagnosis.",
        version="0.1.0",
    )
    app.add_middleware(BodyLimit, max_body=limits.max_body, max_bytes=limits.max_bytes)
    page = files("serving").joinpath("page.html").read_text()
    # Decoding holds up to one full-size copy of an image: bound how many run at once (see serving.limits).
    decode_slots = threading.BoundedSemaphore(limits.decode_slots)

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
        file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, BMP, TIFF or DICOM)")],
        heatmap: Annotated[bool, Query(description="also return a Grad-CAM overlay")] = False,
    ) -> Prediction:
        upload = file.file  # spooled by Starlette (on disk past 1 MB); read only inside a decode slot
        upload.seek(0, 2)
        size = upload.tell()
        upload.seek(0)
        if size == 0:
            raise HTTPException(400, "the uploaded file is empty")
        if size > limits.max_bytes:
            raise HTTPException(413, f"upload is larger than the limit of {limits.max_bytes} bytes")
        with decode_slots:
            try:
                image = predictor.preprocess(upload, limits.max_pixels)
            except UnsupportedImage as e:
                raise HTTPException(415, str(e)) from None
            except TooManyPixels as e:
                raise HTTPException(413, str(e)) from None
            except ImageDecodeError as e:
                raise HTTPException(422, f"the image could not be decoded: {e}") from None
        result = predictor.predict(image, heatmap)
        return Prediction(**result, model=str(info["name"]))

    return app
