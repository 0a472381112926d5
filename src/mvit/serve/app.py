"""The HTTP API and the web page of `mvit serve`, on FastAPI.

    GET  /healthz        liveness, whether a token is needed; never needs the token
    GET  /v1/heads       the model's heads: classes, positive class, threshold, calibration
    POST /v1/predict     multipart `images` (one or more files), `head` (repeated, or `all`),
                         `abstain`: the records `mvit predict --format json` writes
    POST /v1/attention   multipart `image`, `head`, optional `class` and `map`: a PNG overlay
    GET  /               the web page (static files under /static); /docs, /redoc and /openapi.json

Every refusal is JSON `{"error": "<one sentence>"}` with a 4xx status (503 and Retry-After when
overloaded); a bug is a 500 with the same shape and its traceback in the server's log, never in the
answer. The multipart bodies are read by hand (`uploads.read_form`) to keep them within the limits
and in memory, so their schema is given to OpenAPI explicitly.
"""

from __future__ import annotations

import hmac
import json
import os
import urllib.parse
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi_offline import FastAPIOffline
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mvit import __version__
from mvit.core.model import Model
from mvit.infer.prediction import thresholds_for
from mvit.serve.clients import ClientSlots
from mvit.serve.service import ATTENTION_MAPS, Service, admitted
from mvit.serve.settings import ServeSettings
from mvit.serve.uploads import ApiError, read_form

SETTINGS_ENV = "MVIT_SERVE_SETTINGS"  # the settings, as JSON, for worker processes (`--workers`)

# the page loads nothing from elsewhere, and nothing else may frame it
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ErrorBody(BaseModel):
    error: str  # one sentence


class HeadDescription(BaseModel):
    name: str
    dataset: str
    classes: list[str]
    positive: Optional[str]  # binary heads: the class screened for
    threshold: Optional[float]  # binary heads: the positive-class probability that decides it (stored, else 0.5)
    threshold_target: Optional[str]
    temperature: float
    calibrated: bool  # whether the threshold and temperature were fitted for these weights
    metrics: dict[str, float]
    description: str


class SiteDescription(BaseModel):
    name: str
    images: int  # labelled images its heads learned from
    heads: list[str]  # the heads it adapted (the others answer as the base heads)


class HeadsBody(BaseModel):
    heads: list[HeadDescription]
    gate: bool  # whether the model has an out-of-distribution gate (records carry ood_score, and `abstain` works)
    sites: list[SiteDescription] = []  # the model's site profiles: the `site` field of /v1/predict and /v1/attention
    limits: dict[str, int]


class PredictionRecord(BaseModel):
    image: str | int
    head: str
    label: str
    probability: Optional[float]
    probabilities: dict[str, float]
    threshold: Optional[float]
    ood_score: Optional[float]
    in_distribution: Optional[bool]


def _multipart(properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}
HEADS = {"type": "array", "items": {"type": "string"}, "description": "head names, repeated; `all` (the default) for every head"}
SITE = {"type": "string", "description": "a site profile of the model (`mvit adapt`): answer with its heads; none: the base heads"}
REFUSALS = {status: {"model": ErrorBody, "description": says} for status, says in {
    400: "a form that cannot be read, or that ends before its closing boundary (cut short)",
    401: "no token, or the wrong one (when the server needs one)",
    408: "the body did not arrive within the body timeout",
    413: "the body is over the size limit, or an image over the pixel limit",
    415: "not multipart/form-data",
    422: "an image that cannot be decoded, an unknown head or class, an invalid field",
    429: "this client has the most requests in flight one client may: retry after the seconds in Retry-After",
    503: "overloaded: retry after the seconds in Retry-After",
}.items()}


def create_app(model: Model, settings: ServeSettings) -> FastAPI:
    """The app for one loaded model; the model thread starts and stops with the app's lifespan.

    Long on purpose: every route is a closure over this model's service and client slots, declared
    here in one place, so the function reads top to bottom as the HTTP API's reference."""
    service = Service(model, settings)
    clients = ClientSlots(settings.max_client_requests)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:  # after the server has finished its in-flight requests
            service.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN; a clinic's server may have no
    # internet, so these serve the same pages from files installed with fastapi-offline
    app = FastAPIOffline(title="mvit", version=__version__, lifespan=lifespan, root_path=settings.root_path,
                         description="Classify dermoscopic skin-lesion images with one ViT backbone and many classifier heads.")
    app.add_middleware(JsonTrustedHost, allowed_hosts=settings.trusted_hosts)
    _add_error_handlers(app)

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise ApiError(401, "this server needs its token: send the header `Authorization: Bearer <token>`",
                           {"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses={401: REFUSALS[401]})

    @api.get("/heads", response_model=HeadsBody)
    def heads() -> HeadsBody:
        """The model's heads, with what a client needs to read their answers."""
        chosen = list(model.heads)
        thresholds = thresholds_for(model.heads, chosen, None)
        return HeadsBody(
            heads=[HeadDescription(**model.heads[name].model_dump(include=set(HeadDescription.model_fields) - {"threshold", "classes"}),
                                   classes=list(model.heads[name].classes), threshold=thresholds[name]) for name in chosen],
            gate=model.ood_gate is not None,
            sites=[SiteDescription(name=name, images=site.info.images, heads=list(site.info.heads)) for name, site in model.sites.items()],
            limits={"max_upload_bytes": settings.max_upload_bytes, "max_images": settings.max_images, "max_pixels": settings.max_pixels},
        )

    @api.post("/predict", openapi_extra=_multipart({"images": FILES, "head": HEADS, "abstain": {"type": "boolean"}, "site": SITE}, ["images"]),
              responses={200: {"model": list[PredictionRecord], "description": "a record per image and head, image by image"},
                         **{status: REFUSALS[status] for status in (400, 408, 413, 415, 422, 429, 503)}})
    async def predict(request: Request) -> Response:
        """Each image's answer from each chosen head, as `mvit predict --format json` writes them."""
        with clients.held(request), admitted(service.batcher, 1) as admission:  # the body counts against the queue from the start
            form = await read_form(request, max_bytes=settings.max_upload_bytes, max_files=settings.max_images,
                                   timeout_s=settings.body_timeout_s)
            uploads = form.files.get("images", [])
            if not uploads:
                raise ApiError(422, "no images: send one or more image files in the form field `images`")
            names = service.heads(form.values.get("head", []))
            abstain = form.flag("abstain")
            admission.grow(len(uploads) - 1)
            records = await service.predict(uploads, names, abstain=abstain, site=form.value("site"))
        return JSONResponse(records)

    @api.post("/attention", response_class=Response,
              openapi_extra=_multipart({"image": {"type": "string", "format": "binary"}, "head": {"type": "string"},
                                        "class": {"type": "string", "description": "the class to explain (default: the head's decision)"},
                                        "map": {"type": "string", "enum": list(ATTENTION_MAPS)}, "site": SITE}, ["image", "head"]),
              responses={200: {"content": {"image/png": {}}, "description": "the map over the image; X-Mvit-Class: the class explained"},
                         **{status: REFUSALS[status] for status in (400, 408, 413, 415, 422, 429, 503)}})
    async def attention(request: Request) -> Response:
        """Where the model looked to give the head's answer, drawn over the image as a PNG."""
        with clients.held(request), admitted(service.batcher, 1):
            form = await read_form(request, max_bytes=settings.max_upload_bytes, max_files=1, timeout_s=settings.body_timeout_s)
            uploads = form.files.get("image", [])
            head = form.value("head")
            if len(uploads) != 1 or head is None:
                raise ApiError(422, "send one image file in the form field `image` and a head name in `head`")
            overlay = await service.attention(uploads[0], head, target=form.value("class"), view=form.value("map") or ATTENTION_MAPS[0],
                                              site=form.value("site"))
        return Response(overlay.png, media_type="image/png",
                        headers={"X-Mvit-Head": header_value(overlay.head), "X-Mvit-Class": header_value(overlay.explains)})

    app.include_router(api)

    @app.get("/healthz")
    def healthz() -> dict:
        """Alive and answering; whether the API needs a token; images waiting, and the batches run so far."""
        batcher = service.batcher
        return {"status": "ok", "token_required": settings.token is not None, "waiting_images": batcher.waiting,
                "batches": batcher.batches_run, "batched_images": batcher.images_run}

    page = resources.files("mvit.serve") / "page"

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((page / "index.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(packages=[("mvit.serve", "page")]), name="static")
    return app


class JsonTrustedHost:
    """Starlette's check of the Host header (TrustedHostMiddleware), refusing in the JSON shape every
    other refusal has; Starlette's own refusal is plain text."""

    def __init__(self, app, allowed_hosts: list[str]):
        self.app, self.allowed_hosts = app, allowed_hosts
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=allowed_hosts, www_redirect=False)

    async def _passed(self, scope, receive, send) -> None:
        scope[HOST_PASSED] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        async def unless_refused(message) -> None:  # Starlette's plain-text refusal is dropped
            if scope.get(HOST_PASSED):
                await send(message)

        await self.check(scope, receive, unless_refused)
        if not scope.get(HOST_PASSED):
            host = next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"host"), "")
            sentence = (f"this server does not answer to the Host {host!r}; call it by one of {', '.join(self.allowed_hosts)} "
                        f"(or start it with --allowed-host NAME)")
            await JSONResponse({"error": sentence}, status_code=400)(scope, receive, send)


HOST_PASSED = "mvit.host_passed"  # set in the ASGI scope once the Host header is accepted


def _add_error_handlers(app: FastAPI) -> None:
    def refuse(status: int, sentence: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse({"error": sentence}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return refuse(error.status, error.sentence, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            return refuse(404, f"there is nothing at {request.url.path}; the API is under /v1 (see /docs)")
        if error.status_code == 405:
            return refuse(405, f"{request.url.path} does not take {request.method}", error.headers)
        return refuse(error.status_code, str(error.detail), error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"msg": "invalid request"}
        return refuse(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first['msg']}".lstrip(": "))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, and the server logs it with its traceback
        return refuse(500, "mvit failed on this request; the server's log has the details")


def header_value(text: str) -> str:
    """Text for an HTTP header (latin-1 only), percent-encoded where it is not plain ASCII."""
    return urllib.parse.quote(text, safe=" -_.,;:()")


def app_from_environment() -> FastAPI:
    """The app for a worker process of `mvit serve --workers N`: the settings come as JSON in
    $MVIT_SERVE_SETTINGS, and each worker loads its own copy of the model."""
    import torch

    from mvit.core import model_file
    from mvit.runtime.precision import resolve_device

    settings = ServeSettings.model_validate(json.loads(os.environ[SETTINGS_ENV]))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))  # the workers share the cores
    return create_app(model_file.load(settings.model, device=resolve_device(settings.device)), settings)
