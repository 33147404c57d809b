"""Request entries to pixels: base64, data URIs and (with --allow-urls) public http(s) URLs,
decoded by the image reader, so a bad entry gets the reader's category and reason."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import torch

from vitport.errors import UnreadableImageError
from vitport.inputs import read_image_bytes

BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\r\n]*")  # base64, as wrapped at 76 columns or not
DATA_URI = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)
MAX_REDIRECTS = 3
URL_TIMEOUT_S = 10.0


class EntryError(Exception):
    """One entry of a request that cannot be used: a short code and a one-line reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Decoded:
    """One entry ready for the batcher."""

    pixels: torch.Tensor  # [3, H, W] in the served dtype
    size: tuple[int, int]  # width, height of the decoded image


def entry_bytes(text: Any, allow_urls: bool, max_bytes: int) -> bytes:
    """The image bytes an `input` string carries; EntryError when it carries none."""
    if not isinstance(text, str):
        raise EntryError("bad-input", f"expected a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise EntryError("empty", "empty string; send base64 image bytes or a data: URI")
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise EntryError(
                "url-not-allowed",
                "URLs are not accepted by this server; send the image as base64 (or start it "
                "with --allow-urls)",
            )
        return fetch_url(text, max_bytes)
    if lowered.startswith("data:"):
        return _data_uri(text)
    if not BASE64_TEXT.fullmatch(text):
        preview = text if len(text) <= 40 else text[:37] + "..."
        raise EntryError(
            "plain-text",
            f"plain text, not an image ({preview!r}): this server embeds images; send each "
            "image's bytes as base64 or a data:image/...;base64, URI (a path or a file: URL is "
            "not read by the server)",
        )
    return _b64(text)


def _data_uri(text: str) -> bytes:
    found = DATA_URI.fullmatch(text)
    if found is None:
        raise EntryError("bad-base64", "malformed data: URI; expected data:image/...;base64,...")
    media = found["type"].strip().lower()
    if media and not media.startswith("image/"):
        raise EntryError(
            "unsupported-format", f"data: URI of type {media}; send an image (image/jpeg, ...)"
        )
    if media in ("image/svg+xml",):
        raise EntryError("unsupported-format", "SVG is a vector format; send a raster image")
    if ";base64" not in found["params"].lower():
        raise EntryError("bad-base64", "data: URI without ;base64; send base64-encoded bytes")
    return _b64(found["data"])


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EntryError("bad-base64", f"not valid base64 ({exc})") from exc


def blocked_address(host: str) -> str | None:
    """Why `host` must not be fetched (it resolves to a private, loopback, link-local or other
    non-public address), or None when every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {host} ({exc})"
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if getattr(address, "ipv4_mapped", None):
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            return f"{host} resolves to {address}, a non-public address"
    return None


def fetch_url(url: str, max_bytes: int) -> bytes:
    """GET a public http(s) URL, at most `max_bytes`, re-checking every redirect's host."""
    import httpx

    with httpx.Client(timeout=URL_TIMEOUT_S, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise EntryError("url-not-allowed", f"only http(s) URLs are fetched, not {url}")
            reason = blocked_address(parts.hostname)
            if reason is not None:
                raise EntryError("url-not-allowed", f"refused to fetch {url}: {reason}")
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise EntryError(
                            "url-failed", f"{url} answered HTTP {response.status_code}"
                        )
                    data = bytearray()
                    for chunk in response.iter_bytes():
                        data += chunk
                        if len(data) > max_bytes:
                            raise EntryError("too-large", f"{url} is larger than {max_bytes} bytes")
                    return bytes(data)
            except httpx.HTTPError as exc:
                raise EntryError("url-failed", f"could not fetch {url} ({exc})") from exc
    raise EntryError("url-failed", f"{url}: more than {MAX_REDIRECTS} redirects")


def decode(
    data: bytes, name: str, preprocess: Callable[[list[Any]], torch.Tensor], dtype: torch.dtype
) -> Decoded:
    """Image bytes to one preprocessed pixel tensor; EntryError with the reader's category."""
    try:
        image = read_image_bytes(data, name)
    except UnreadableImageError as exc:
        raise EntryError(exc.category, exc.reason) from exc
    try:
        pixels = preprocess([image])[0].to(dtype)
    except Exception as exc:  # one odd image must fail alone
        raise EntryError("preprocess", f"preprocessing failed: {exc}") from exc
    return Decoded(pixels, image.size)
