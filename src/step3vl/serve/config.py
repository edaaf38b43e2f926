"""The server's limits and settings: one frozen dataclass, every field with its reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """What ``step3vl serve`` accepts; every limit violated is a 4xx error in the OpenAI error shape."""

    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>" (else 401)
    model_name: str = ""  # the id /v1/models lists and requests must name; "" = the checkpoint's model name
    max_request_bytes: int = 8 << 20  # request body (413 above it; images arrive base64 inside it)
    max_image_bytes: int = 4 << 20  # one decoded image file (413)
    max_image_pixels: int = 12_000_000  # one image, width x height, read from the header before decoding (400)
    max_images: int = 4  # images per request (400)
    max_messages: int = 64  # messages per request (400)
    max_tokens: int = 1024  # ceiling on max_tokens (400 above it); also the default when a request gives none
    max_n: int = 8  # choices per request (400)
    max_pacore_samples: int = 64  # samples per request: sum of PaCoRe rounds x n, or K x n for majority@K (400)
    max_pending: int = 256  # requests queued or running; one more is refused with 429
    max_batch_sequences: int = 64  # sequences (prompts x n) decoded together in one engine call
    batch_wait_s: float = 0.005  # how long the worker waits for more compatible requests before it runs

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_bytes", "max_image_pixels", "max_tokens", "max_n",
                     "max_pending", "max_batch_sequences", "max_messages", "max_pacore_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve config: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_images < 0 or self.batch_wait_s < 0:
            raise ValueError("serve config: max_images and batch_wait_s must be >= 0")
