"""OpenAI-compatible endpoints (vLLM, llama.cpp server, Ollama, hosted APIs): one request per prompt.

What the client guarantees:
- Redirects are refused, never followed. Python's urllib follows a 301/302/303 to another host,
  port or scheme and re-sends the Authorization header there (turning the POST into a bodyless
  GET on the way). Here any 3xx answer is an error naming where it pointed (redacted), so the API
  key is sent to the named endpoint only; nothing is followed, with or without the header.
- Plain http to a host that is not loopback is warned about on stderr, once per endpoint: the
  passages, and the key when there is one, travel unencrypted.
- Every failure is a DrscalingError naming the endpoint (redacted: no user:password@, no query
  string) and the cause: refused or reset connections, a reply that is not HTTP, timeouts, HTTP
  errors, bodies that are not JSON. Nothing escapes as a raw urllib / http.client exception.
- Bounded time: one attempt waits at most `timeout_s` to connect, for each read of the headers and
  for the whole body; timeouts, resets, dropped connections and HTTP 408/429/5xx are tried
  `attempts` times with 1 s, 2 s, ... (at most 10 s) between. One request therefore gives up after
  request_bound_s(timeout_s, attempts): 3 x 30 s + 3 s = 93 s with the defaults. Requests of a batch
  run concurrently, so a batch takes about as long as its slowest request.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from drscaling.annotation.bounds import REQUEST_ATTEMPTS, backoff_s, request_bound_s
from drscaling.annotation.config import Completion, PartialBatchError
from drscaling.annotation.local import truncate_words
from drscaling.annotation.prompts import CHAT_PROMPTS
from drscaling.errors import DrscalingError

MAX_BODY_BYTES = 64 * 2**20  # an answer this large is not a chat completion
_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


def redact_url(url: str) -> str:
    """Drop user:password@ and the query string, which may carry credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def is_loopback(host: str | None) -> bool:
    host = (host or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_plain_http(endpoint: str, sends_key: bool) -> None:
    """Once per endpoint and process: plain http to a non-loopback host, on stderr."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http" or is_loopback(parts.hostname):
        return
    shown = redact_url(endpoint)
    with _WARN_LOCK:
        if shown in _WARNED:
            return
        _WARNED.add(shown)
    what = "the API key and the passages travel" if sends_key else "the passages travel"
    print(f"drscaling: warning: endpoint {shown} is plain http to a host that is not loopback: {what} "
          "unencrypted; use https", file=sys.stderr)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """No redirect is followed: urllib then raises the 3xx as an HTTPError, reported by _http_error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Transient(Exception):
    """A failure worth another attempt (timeout, reset, 408/429/5xx)."""


class EndpointGenerator:
    """POST {endpoint}/chat/completions (or /completions), `concurrency` requests at a time.

    Configuration errors (refused connection, rejected key, 404, redirect, not HTTP, not JSON) stop
    at once; transient ones are retried within the time bound above. A batch whose requests partly
    failed raises PartialBatchError with the finished ones, which the caller keeps."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, prompt_kind: str,
                 max_new_tokens: int, temperature: float, top_p: float, timeout_s: float,
                 concurrency: int, attempts: int = REQUEST_ATTEMPTS):
        if not endpoint.startswith(("http://", "https://")):
            raise DrscalingError(f"endpoint must be an http(s) URL (got {redact_url(endpoint)!r})")
        if not timeout_s > 0 or attempts < 1:
            raise DrscalingError(f"endpoint timeout must be > 0 s and attempts >= 1 (got {timeout_s}, {attempts})")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.name, self.device = model, f"endpoint {redact_url(endpoint)}"
        self._key = api_key
        self.prompt_kind, self.max_new_tokens = prompt_kind, max_new_tokens
        self.temperature, self.top_p, self.timeout_s = temperature, top_p, timeout_s
        self.concurrency, self.attempts = max(1, concurrency), attempts
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        warn_if_plain_http(endpoint, sends_key=bool(api_key))

    def __repr__(self) -> str:  # never show the key
        return f"EndpointGenerator({self.device}, model={self.name!r})"

    def truncate(self, passage: str, max_tokens: int) -> str:
        return truncate_words(passage, max_tokens)  # no tokenizer here: words bound tokens from below

    def complete(self, prompts: Sequence[str], sample: bool, seed: int) -> list[Completion]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, p) for p in prompts]
        done: dict[int, Completion] = {}
        first: DrscalingError | None = None
        for i, future in enumerate(futures):
            try:
                done[i] = future.result()
            except DrscalingError as exc:
                first = first or exc
        if first is not None:
            failed = len(prompts) - len(done)
            raise PartialBatchError(f"{first}; {failed} of {len(prompts)} request(s) of the batch failed", done)
        return [done[i] for i in range(len(prompts))]

    def _one(self, prompt: str) -> Completion:
        if self.prompt_kind in CHAT_PROMPTS:
            path, body = "/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/completions", {"prompt": prompt, "stop": ["\n"]}
        body.update(model=self.name, max_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p)
        answer = self._post(self.url.removesuffix("/chat/completions") + path, body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise DrscalingError(f"{self.device} answered without choices[0] text: not an OpenAI-compatible API?") from exc
        usage = answer.get("usage") or {}
        return Completion(str(text or ""), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))

    def _post(self, url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        for attempt in range(self.attempts):
            try:
                raw = self._send(url, data)
            except _Transient as exc:
                if attempt + 1 < self.attempts:
                    time.sleep(backoff_s(attempt))
                    continue
                bound = request_bound_s(self.timeout_s, self.attempts)
                raise DrscalingError(
                    f"{self.device}: {exc}; gave up after {self.attempts} attempt(s) of at most "
                    f"{self.timeout_s:g} s ({bound:g} s in all; see --timeout / --attempts)") from None
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DrscalingError(
                    f"{self.device} did not answer with JSON (got {raw[:80]!r}...): is the base URL an "
                    "OpenAI-compatible API (e.g. http://host:8000/v1)?") from None
        raise AssertionError("unreachable")

    def _send(self, url: str, data: bytes) -> bytes:
        """One attempt: the body of a 2xx answer; _Transient or DrscalingError otherwise."""
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                return self._read_body(resp)
        except urllib.error.HTTPError as exc:  # before URLError: it is one
            exc.close()
            raise self._http_error(exc, url) from None
        except urllib.error.URLError as exc:  # connecting failed; the cause is in .reason
            reason = exc.reason
            raise self._transport_error(reason if isinstance(reason, BaseException) else OSError(str(reason))) from None
        except (http.client.HTTPException, OSError) as exc:  # after connecting: timeouts, resets, not HTTP
            raise self._transport_error(exc) from None

    def _read_body(self, resp) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        chunks, size = [], 0
        while chunk := resp.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise DrscalingError(f"{self.device} sent an answer larger than {MAX_BODY_BYTES >> 20} MiB")
            if time.monotonic() > deadline:
                raise TimeoutError("the answer took longer than the timeout to arrive")
        return b"".join(chunks)

    def _http_error(self, exc: urllib.error.HTTPError, url: str) -> Exception:
        code = exc.code
        if 300 <= code < 400:
            return self._redirect_error(code, url, exc.headers.get("Location") if exc.headers else None)
        if code in (401, 403):
            return DrscalingError(
                f"{self.device} rejected the API key (HTTP {code}); set DRSCALING_LLM_API_KEY "
                "or OPENAI_API_KEY (or the api_key parameter)")
        if code == 404:
            return DrscalingError(
                f"{self.device}: {urllib.parse.urlsplit(url).path} not found (HTTP 404); the base URL "
                "usually ends in /v1, and the model name must be one the server serves")
        if code in (408, 429) or code >= 500:
            return _Transient(f"HTTP {code}")
        return DrscalingError(f"{self.device} failed with HTTP {code}")

    def _redirect_error(self, code: int, url: str, location: str | None) -> DrscalingError:
        if not location:
            return DrscalingError(f"{self.device} answered HTTP {code} (a redirect without a Location); not followed")
        target = urllib.parse.urljoin(url, location)
        if _origin(target) != _origin(url):
            return DrscalingError(
                f"{self.device} redirected (HTTP {code}) to {redact_url(target)}, another host, port or scheme; "
                "redirects are refused so the API key and passages go nowhere else. If you trust that "
                "server, name it as the endpoint")
        return DrscalingError(
            f"{self.device} redirected (HTTP {code}) to {redact_url(target)}; redirects are not followed "
            "(a POST would be re-sent as a GET): name that URL's base as the endpoint")

    def _transport_error(self, cause: BaseException) -> Exception:
        """A socket / protocol failure as _Transient (worth another attempt) or DrscalingError."""
        where = self.device
        if isinstance(cause, TimeoutError):
            return _Transient(f"no answer within the {self.timeout_s:g} s timeout")
        if isinstance(cause, http.client.RemoteDisconnected):  # before BadStatusLine: it is one
            return _Transient("the server closed the connection without answering")
        if isinstance(cause, ConnectionRefusedError):
            return DrscalingError(f"cannot reach {where}: connection refused (is a server listening on that host and port?)")
        if isinstance(cause, ConnectionResetError | ConnectionAbortedError | BrokenPipeError | http.client.IncompleteRead):
            return _Transient(f"the connection broke ({type(cause).__name__})")
        if isinstance(cause, http.client.BadStatusLine | http.client.LineTooLong):
            line = str(cause)[:80]
            return DrscalingError(f"{where} did not answer HTTP (got {line!r}): is the endpoint an HTTP server on that port?")
        if isinstance(cause, ssl.SSLError | ssl.CertificateError):
            return DrscalingError(f"cannot reach {where}: TLS failed ({cause})")
        if isinstance(cause, socket.gaierror):
            return DrscalingError(f"cannot reach {where}: the host name does not resolve ({cause.strerror or cause})")
        if isinstance(cause, http.client.HTTPException):
            return DrscalingError(f"{where} broke the HTTP protocol ({type(cause).__name__}: {cause})")
        return DrscalingError(f"cannot reach {where}: {cause}")
