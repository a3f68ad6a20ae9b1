"""A small JSON-over-HTTP endpoint for recommendations (standard library only).

Built on ``http.server`` rather than a web framework so that it runs on the
same small devices as the client agent, with nothing more to install.

* ``GET /health`` -> ``{"status": "ok", "items": I, "round": r, "averaged_rounds": [...],
  "quantization": q, "local_adapters": digest, "new_items": n}`` (digest empty unless
  ``--local-adapters``; n: items added after training with ``--new-items``)
* ``GET /users/<user_id>/recommendations?k=10`` -> ``{"user_id": ..., "recommendations": [...]}``
* ``POST /recommendations`` with ``{"items": [ids], "texts": [titles], "k": 10}``
  -> ``{"recommendations": [...]}`` for a new user.

Errors are JSON ``{"error": message}``: 400 for a malformed request (bad JSON,
bad ``k``), 404 for an unknown user or path, 422 for unknown items or an empty
history.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from fedrec.serving.recommender import (
    EmptyHistoryError,
    Recommender,
    ServingError,
    UnknownItemError,
    UnknownUserError,
)

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BODY_BYTES = 1 << 20


class BadRequest(ServingError):
    """The request itself is malformed (HTTP 400)."""


def _status(err: ServingError) -> HTTPStatus:
    if isinstance(err, UnknownUserError):
        return HTTPStatus.NOT_FOUND
    if isinstance(err, (UnknownItemError, EmptyHistoryError)):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    return HTTPStatus.BAD_REQUEST


def _parse_k(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest(f"'k' must be an integer in 1..{MAX_K}, not {value!r}")
    try:
        k = int(value)
    except ValueError:
        raise BadRequest(f"'k' must be an integer in 1..{MAX_K}, not {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"'k' must be an integer in 1..{MAX_K}, not {k}")
    return k


def _string_list(body: dict, key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
        raise BadRequest(f"'{key}' must be a list of strings")
    return [str(v) for v in value]


def make_handler(recommender: Recommender) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to ``recommender``."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "fedrec"

        def _send(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _guarded(self, answer) -> None:
            try:
                self._send(HTTPStatus.OK, answer())
            except ServingError as err:
                self._send(_status(err), {"error": str(err)})
            except Exception:
                log.exception("request %s failed", self.path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            if parts == ["health"]:
                self._guarded(
                    lambda: {
                        "status": "ok",
                        "items": recommender.num_items,
                        "round": recommender.trained.server_round,
                        "averaged_rounds": list(recommender.trained.averaged_rounds),
                        "quantization": recommender.trained.quantization,
                        "local_adapters": recommender.trained.local_adapters,
                        "new_items": recommender.num_items - recommender.trained.prepared.num_items,
                    }
                )
            elif len(parts) == 3 and parts[0] == "users" and parts[2] == "recommendations":
                query = parse_qs(url.query)

                def answer() -> dict:
                    k = _parse_k(query.get("k", ["10"])[-1])
                    found = recommender.for_user(parts[1], k)
                    return {"user_id": parts[1], "recommendations": [r.to_json() for r in found]}

                self._guarded(answer)
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path!r}"})

        def do_POST(self) -> None:
            if urlparse(self.path).path.rstrip("/") != "/recommendations":
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
                return

            def answer() -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise BadRequest(f"request body over {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as err:
                    raise BadRequest(f"body is not JSON: {err}") from None
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                k = _parse_k(body.get("k", 10))
                found = recommender.for_history(_string_list(body, "items"), _string_list(body, "texts"), k)
                return {"recommendations": [r.to_json() for r in found]}

            self._guarded(answer)

        def log_message(self, format: str, *args: object) -> None:
            log.info("%s %s", self.address_string(), format % args)

    return Handler


def make_server(recommender: Recommender, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """An HTTP server answering for ``recommender`` (call ``serve_forever``)."""
    return ThreadingHTTPServer((host, port), make_handler(recommender))
