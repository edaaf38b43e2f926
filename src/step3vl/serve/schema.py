"""Request and response bodies of the OpenAI chat-completions API (the subset served), as pydantic
models: they validate requests and generate the server's OpenAPI spec.

Unknown request fields are refused (``extra="forbid"``), as OpenAI does ("Unrecognized request
argument"), so a parameter this server does not implement is an error, never silently ignored.
Its extensions: ``mode`` (``sere``, ``majority@K`` or ``pacore``: how each choice is answered) and ``pacore``
(Parallel Coordinated Reasoning rounds).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid")


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(description="A data URI: data:image/png;base64,... or data:image/jpeg;base64,...")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class PaCoReOptions(BaseModel):
    """Parallel Coordinated Reasoning: ``rounds[i]`` parallel samples in round i; the last round's
    single synthesis is the answer (e.g. ``{"rounds": [16]}``: 16 drafts, then one synthesis)."""

    model_config = _STRICT
    rounds: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=8)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _STRICT
    model: str
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None
    mode: str | None = Field(
        None, pattern=r"^(sere|majority@[1-9][0-9]{0,2}|pacore)$",
        description="Extension: how each choice is answered. sere (the default): one sample; majority@K: K samples, "
                    "the first whose conclusion (text after the last </think>) is the most common is returned; "
                    "pacore: parallel rounds then one synthesis (rounds from `pacore`, default [16])")
    pacore: PaCoReOptions | None = Field(
        None, description="Extension: run PaCoRe (parallel rounds, then synthesis) instead of one sample")


# --------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class PaCoReInfo(BaseModel):
    rounds: list[int]
    round_tokens: list[list[int]] = Field(description="per choice: tokens generated in each round")


class MajorityInfo(BaseModel):
    k: int
    votes: list[int] = Field(description="per choice: how many of its K samples share its conclusion")
    sample_tokens: list[int] = Field(description="per choice: tokens generated over all K samples")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    pacore: PaCoReInfo | None = None
    majority: MajorityInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "step3vl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape: every 4xx/5xx this server returns has this body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    pending: int
