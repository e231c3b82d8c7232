"""The deletion service's HTTP API (FastAPI): usable on its own (``fastapi.testclient``) and as Ray Serve's ingress.

Endpoints (every one needs ``Authorization: Bearer <API key>``, :mod:`erasus_ray.serve.keys`):

- ``POST /v1/deletions`` - ``{"request_id", "level": sample|class|client, "ids"|"label", "reason"}``; 202 with the
  ledger's request id (the same ``request_id`` again returns the same request); class deletion is operator-only.
- ``GET /v1/deletions/{id}`` - state, reason, verification and the transition history of one of the caller's requests.
- ``GET /v1/deletions?state=...`` - the caller's requests (an operator: all).
- ``GET /v1/ownership`` - the dataset ids the caller owns (what it may delete).
- ``GET /v1/audit/export?state=...&hash_ids=...`` - the ledger's audit records as JSON lines (an operator: every
  request; a client: the requests it submitted).
- ``POST /predict`` - ``{"inputs": [[...], ...]}`` -> predictions and the ``model_version`` that made them
  (a classifier); ``POST /generate`` - ``{"prompts": [...], "max_new_tokens"}`` -> greedy completions and the
  ``model_version`` (a task with the ``generation`` capability, e.g. the causal-LM ``authors`` benchmark).
- ``GET /v1/model``, ``POST /v1/model/rollback`` (operator) - the served version; serve its parent again and reopen
  (state back to ``validated``, reason "reopened: ...") the requests the rolled-back version carried.

Refusals: 401 (no or wrong key), 403 (another client's ids, an operator endpoint, impersonation), 404 (no such
request *of the caller*: another client's request reads exactly like a missing one), 409 (request id reused for a
different request), 422 (malformed), 429 (rate limit). A refusal never names another client's ids or requests: a
``not_owner`` answer says how many of the caller's ids are not its own, never which client owns them, and the
ledger's audit split (unknown vs another client's) is stripped from what a client reads.

Cost: a submission is one ledger transaction (+ one PBKDF2 the first time a key is seen); ``/predict`` is one forward
pass (+ a reload after a new version is published).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Optional

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from erasus_ray.errors import InvalidConfigError, InvalidRequestError
from erasus_ray.ledger import STATES, LedgerEntry
from erasus_ray.serve.keys import Principal
from erasus_ray.serve.service import DeletionService
from erasus_ray.serve.versions import ServedModel
from erasus_ray.tasks import Capability

logger = logging.getLogger("erasus_ray.serve")

#: HTTP status of a ledger rejection, by its code (anything else: 422)
REFUSAL_STATUS = {"not_owner": 403, "impersonation": 403, "unknown_client": 403, "rate_limited": 429}
NOT_OWNER_MESSAGE = "some of the requested ids are not yours to delete"
#: most tokens one /generate call decodes per prompt (greedy, no KV cache on wrappers: the cost grows with it)
MAX_NEW_TOKENS = 128


class DeletionBody(BaseModel):
    """A deletion request as a client sends it (the client id comes from its key, never from the body)."""

    model_config = ConfigDict(extra="forbid")
    request_id: StrictStr = Field(description="your idempotency key: the same id again returns the same request")
    level: StrictStr = Field("sample", description="sample | class (operator only) | client")
    ids: Optional[list[StrictInt]] = Field(None, description="dataset ids to forget (sample level)")
    label: Optional[StrictInt] = Field(None, description="the class to forget (class level)")
    reason: StrictStr = ""


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[list[float]] = Field(min_length=1, max_length=4096)


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[Annotated[StrictStr, Field(min_length=1, max_length=2000)]] = Field(min_length=1, max_length=16)
    max_new_tokens: StrictInt = Field(32, ge=1, le=MAX_NEW_TOKENS)


def create_app(service: DeletionService) -> FastAPI:
    """The FastAPI app over ``service`` (its ledger, keys, ownership and model versions)."""
    app = FastAPI(title="erasus-ray deletion service", version="1")
    served = ServedModel(service.versions)

    def principal(authorization: Optional[str] = Header(None)) -> Principal:
        key = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
        who = service.keys.authenticate(key)
        if who is None:
            logger.warning("refused a call: %s API key", "no" if key is None else "an unknown or wrong")
            raise HTTPException(401, {"code": "unauthenticated", "message": "a valid API key is required (Authorization: Bearer ...)"},
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def operator(who: Principal = Depends(principal)) -> Principal:
        if not who.operator:
            logger.warning("refused %r: operator-only endpoint", who.client_id)
            raise HTTPException(403, {"code": "operator_only", "message": "this needs the operator role"})
        return who

    @app.post("/v1/deletions", status_code=202)
    def submit(body: DeletionBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        if body.level == "class" and not who.operator:
            logger.warning("refused %r: class deletion is operator-only", who.client_id)
            raise HTTPException(403, {"code": "operator_only", "message": "class deletion needs the operator role"})
        payload = {**body.model_dump(exclude_none=True), "client_id": who.client_id}
        try:
            entry = service.ledger.submit(payload, service.ownership, service.limits, sender=who.client_id)
        except InvalidRequestError as err:
            status = 409 if err.code == "conflict" else 422
            raise HTTPException(status, {"code": err.code, "message": str(err)}) from None
        if entry.state == "rejected":
            code = entry.error_code or "rejected"
            message = NOT_OWNER_MESSAGE if code == "not_owner" else entry.state_reason
            raise HTTPException(REFUSAL_STATUS.get(code, 422), {"code": code, "message": message, "request_id": entry.request_id})
        return summary(entry)

    @app.get("/v1/deletions/{request_id:path}")
    def status(request_id: str, who: Principal = Depends(principal)) -> dict[str, Any]:
        entry = _visible(service, who, request_id)
        if entry is None:
            raise HTTPException(404, {"code": "unknown_request", "message": "no such request of yours"})
        history = [t.to_dict() for t in service.ledger.history(entry.request_id)]
        if not who.operator:
            history = _client_transitions(history)
        return {**summary(entry), "ids": entry.ids, "label": entry.label, "metrics": entry.metrics,
                "coreset_ids": entry.coreset_ids, "history": history}

    @app.get("/v1/deletions")
    def listing(state: Optional[str] = Query(None), who: Principal = Depends(principal)) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise HTTPException(422, {"code": "malformed", "message": f"state must be one of {list(STATES)}"})
        entries = service.ledger.entries(None if state is None else [state], client_id=None if who.operator else who.client_id)
        if not who.operator:  # requests in the caller's name that it did not submit (an operator's) are not its to read
            entries = [e for e in entries if e.submitter == who.client_id]
        return {"requests": [summary(e) for e in entries]}

    @app.get("/v1/audit/export", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-ndjson": {}}, "description": "one audit record per line"}})
    def audit_export(state: Optional[str] = Query(None), hash_ids: bool = Query(False),
                     who: Principal = Depends(principal)) -> StreamingResponse:
        """The ledger's audit records (:meth:`DeletionLedger.export`) as JSON lines: an operator gets every request;
        a client only the requests it submitted, without the audit split of refused ids."""
        if state is not None and state not in STATES:
            raise HTTPException(422, {"code": "malformed", "message": f"state must be one of {list(STATES)}"})
        records = service.ledger.export(hash_ids=hash_ids, states=None if state is None else [state])
        if not who.operator:
            records = [{**r, "transitions": _client_transitions(r["transitions"])} for r in records
                       if r["submitter"] == who.client_id]
        lines = (json.dumps(r, default=str) + "\n" for r in records)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @app.get("/v1/ownership")
    def ownership(who: Principal = Depends(principal)) -> dict[str, Any]:
        """The dataset ids the caller owns (what it may delete); never another client's."""
        ids = service.ownership.ids_of(who.client_id).tolist()
        return {"client_id": who.client_id, "n_ids": len(ids), "ids": ids}

    @app.post("/predict")
    def predict(body: PredictBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        # only where /generate serves it (a seq2seq adapter generates too, but without a tokenizer has no text to take)
        if service.task.provides(Capability.GENERATION) and getattr(service.task, "tokenizer", None) is not None:
            raise HTTPException(409, {"code": "wrong_endpoint", "message": f"the served {service.task.name} model "
                                                                          "generates text: use POST /generate"})
        version, model = served.get()
        x = torch.tensor(body.inputs, dtype=torch.float32)
        try:
            with torch.no_grad():
                logits = model(x)
        except RuntimeError as err:  # wrong feature count
            raise HTTPException(422, {"code": "malformed", "message": f"inputs do not fit the model: {str(err)[:200]}"}) from None
        return {"model_version": version, "predictions": logits.argmax(-1).tolist()}

    @app.post("/generate")
    def generate(body: GenerateBody, who: Principal = Depends(principal)) -> dict[str, Any]:
        """Greedy continuations of ``prompts`` by the served version (a task with the ``generation`` capability and a
        tokenizer, e.g. the causal-LM ``authors`` benchmark); each answer names the version that wrote it."""
        tokenizer = getattr(service.task, "tokenizer", None)
        if not service.task.provides(Capability.GENERATION) or tokenizer is None:
            raise HTTPException(409, {"code": "wrong_endpoint", "message": f"the served {service.task.name} model does "
                                                                          "not generate text: use POST /predict"})
        version, model = served.get()
        return {"model_version": version, "completions": _generate(model, tokenizer, body.prompts, body.max_new_tokens)}

    @app.get("/v1/model")
    def model_info(who: Principal = Depends(principal)) -> dict[str, Any]:
        version = service.versions.current
        meta = service.versions.meta(version)
        return {"model_version": version, "parent": meta["parent"], "published_at": meta["published_at"]}

    @app.post("/v1/model/rollback")
    def rollback(who: Principal = Depends(operator)) -> dict[str, Any]:
        try:
            version, reopened = service.rollback(who.client_id)
        except InvalidConfigError as err:
            raise HTTPException(409, {"code": "no_previous_version", "message": str(err)}) from None
        logger.warning("operator %r rolled the served model back to version %d; reopened %d request(s)", who.client_id,
                       version, len(reopened))
        return {"model_version": version, "reopened": reopened}

    return app


def _generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding, prompts left-padded (so every row continues from its last token); returns only the new text."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def summary(entry: LedgerEntry) -> dict[str, Any]:
    metrics = entry.metrics or {}
    return {"request_id": entry.request_id, "client_request_id": entry.client_request_id, "level": entry.level,
            "state": entry.state, "state_reason": entry.state_reason, "model_version": metrics.get("model_version")}


def _client_transitions(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transitions as a client may read them: the ledger's audit split of refused ids (unknown vs another client's,
    ``details["detail"]``) is the operator's."""
    return [{**t, "details": {k: v for k, v in (t["details"] or {}).items() if k != "detail"}} for t in transitions]


def _visible(service: DeletionService, who: Principal, request_id: str) -> LedgerEntry | None:
    """The request the caller may read under ``request_id`` (its own id or the ledger key), else None."""
    ledger = service.ledger
    if who.operator:
        return ledger.find(request_id) or ledger.find(request_id, client_id=who.client_id)
    entry = ledger.find(request_id, client_id=who.client_id)
    if entry is None:
        entry = ledger.find(request_id)
        entry = entry if entry is not None and entry.submitter == who.client_id else None
    return entry
