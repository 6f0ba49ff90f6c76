"""The FastAPI application: `GET /` (upload page), `POST /predict`, `GET /health`, `GET /model`, and the API
docs at `/docs` and `/redoc`, whose scripts are served from the `fastapi-offline` package (no CDN).

Bad input is a 4xx with a message, never a 5xx: empty bodies or more than one `file` part (400), a body that
arrives too slowly (408), uploads over the byte limit, images over the pixel limit, or decodes past their memory
budget or time limit (413), anything but PNG/JPEG/BMP/TIFF/DICOM by content (415), truncated or corrupt images
(422). The client's file name and content type are never used, and no error body repeats what was uploaded.

Each decode runs in its own process (serving.sandbox) under a decode slot; a DICOM first waits for the one
DICOM decode at a time, without holding a slot, so waiting DICOMs never keep other images from decoding; an
image up to `express_pixels` may use the express slot, so slow uploads in every slot never delay a small one.
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import fastapi_offline
from anyio import to_thread
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from datamodules.dicom import is_dicom
from datamodules.images import ImageDecodeError
from serving import sandbox
from serving.images import TooManyPixels, UnsupportedImage, decode_upload
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


ERRORS = {code: {"model": Problem} for code in (400, 408, 413, 415, 422)}


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without the `input` of each error: for a form it is the uploaded part itself (a part
    sent with only `filename*=` arrives as a text field, and its bytes would be echoed back)."""
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _http_error(e: ImageDecodeError) -> HTTPException:
    if isinstance(e, UnsupportedImage):
        return HTTPException(415, str(e))
    if isinstance(e, TooManyPixels | sandbox.OverBudget):
        return HTTPException(413, str(e))
    return HTTPException(422, f"the image could not be decoded: {e}")


class Decoding:
    """Uploads -> model inputs, each decode in its own process (serving.sandbox), scheduled fairly.

    Decoding holds up to one budget of memory, so at most `decode_slots` run at once (see serving.limits), on
    asyncio primitives: requests waiting for a slot hold no worker thread and no copy of their upload. A DICOM
    first waits for the one DICOM decode at a time (its budget is 4 times an image's), without a slot.
    serving.images keeps a lock of its own for in-process callers; here each decode has a fresh process, where
    that lock is always free.
    """

    def __init__(self, predictor: Predictor | OnnxPredictor, limits: Limits):
        self.predictor, self.limits = predictor, limits
        self.slots = asyncio.Semaphore(limits.decode_slots)
        self.one_dicom = asyncio.Lock()
        self.express = asyncio.Lock()

    def _decode(self, upload, max_pixels: int, seconds: float, budget: int):
        p = self.predictor
        upload.seek(0)
        args = (upload.read(), p.channels, p.image_size, p.resize_mode, max_pixels, p.dicom)
        return sandbox.run(decode_upload, args, seconds, budget)

    async def __call__(self, upload):
        """The (H, W, C) uint8 model input of an upload (a binary file).

        A non-DICOM upload first tries the express slot when it is free: at most `express_pixels`, its budget and
        `express_seconds`. Whatever needs more goes on to a regular slot, so uploads that hold every regular slot
        for their whole time limit never keep a small image waiting.

        Raises:
            ImageDecodeError: and its subclasses (see `_http_error`).
        """
        limits = self.limits
        dicom = is_dicom(await to_thread.run_sync(_head, upload))
        if not dicom and limits.express_pixels and not self.express.locked():
            async with self.express:
                try:
                    return await to_thread.run_sync(self._decode, upload, min(limits.express_pixels, limits.max_pixels),
                                                    min(limits.express_seconds, limits.decode_seconds),
                                                    limits.express_budget())
                except (TooManyPixels, sandbox.OverBudget):
                    pass  # too large or too costly for the express slot
        async with self.one_dicom if dicom else nullcontext():  # waits here without a slot
            async with self.slots:
                return await to_thread.run_sync(self._decode, upload, limits.max_pixels, limits.decode_seconds,
                                                limits.decode_budget(dicom))


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
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would ask validator.swagger.io about the schema
    )
    _serve_redoc_without_cdn(app)
    app.add_middleware(BodyLimit, max_body=limits.max_body, max_bytes=limits.max_bytes,
                       read_timeout=limits.read_timeout, min_rate=limits.min_upload_rate)
    app.add_exception_handler(RequestValidationError, validation_error)
    page = files("serving").joinpath("page.html").read_text()
    decode = Decoding(predictor, limits)

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
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="an image file (PNG, JPEG, BMP, TIFF or DICOM)")],
        heatmap: Annotated[bool, Query(description="also return a Grad-CAM overlay")] = False,
    ) -> Prediction:
        parts = (await request.form()).getlist("file")  # the form FastAPI parsed (Starlette keeps it)
        if len(parts) > 1:
            raise HTTPException(400, f"send one image per request: this one has {len(parts)} `file` parts")
        upload = file.file  # spooled by Starlette (on disk past 1 MB)
        size = await to_thread.run_sync(_size, upload)
        if size == 0:
            raise HTTPException(400, "the uploaded file is empty")
        if size > limits.max_bytes:
            raise HTTPException(413, f"upload is larger than the limit of {limits.max_bytes} bytes")
        try:
            image = await decode(upload)
        except ImageDecodeError as e:
            raise _http_error(e) from None
        result = await to_thread.run_sync(predictor.predict, image, heatmap)
        return Prediction(**result, model=str(info["name"]))

    return app


# ReDoc's bundle draws the "API docs by Redocly" footer logo from its CDN, and links Redocly's site.
REDOC_CDN_LOGO = 'e?r.createElement("img",{alt:"redocly logo",onError:()=>t(!1),src:"https://cdn.redoc.ly/redoc/logo-mini.svg"}):null'
REDOC_LINK = 'href:"https://redocly.com/redoc/"'


def _serve_redoc_without_cdn(app: FastAPI) -> None:
    """Serve fastapi-offline's ReDoc bundle without its CDN logo and outside link, ahead of its static mount."""
    from fastapi.responses import Response
    from fastapi.routing import APIRoute

    path = next(r for r in app.routes if getattr(r, "name", "") == "static-offline-docs").path
    bundle = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
    # tests/serving/test_hardening.py fails when a new bundle changes this code
    script = bundle.read_text(encoding="utf-8").replace(REDOC_CDN_LOGO, "null").replace(REDOC_LINK, 'href:"#"').encode()

    def redoc_js() -> Response:
        return Response(script, media_type="text/javascript")

    app.router.routes.insert(0, APIRoute(f"{path}/redoc.standalone.js", redoc_js, include_in_schema=False))


def _size(upload) -> int:
    upload.seek(0, 2)
    size = upload.tell()
    upload.seek(0)
    return size


def _head(upload) -> bytes:
    head = upload.read(132)  # DICOM's "DICM" sits at byte 128
    upload.seek(0)
    return head
