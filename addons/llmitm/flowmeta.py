"""Keys under which addons leave their decisions on ``flow.metadata``.

Values are plain data (str, bool, int, lists and dicts of those) so flows still save with
mitmproxy's FlowWriter. Each addon reads what the ones before it decided.
"""

from __future__ import annotations

SESSION = "llmitm.session"  # str: the session id the request acts as
PROVIDER = "llmitm.provider"  # str | None: provider name from config.providers (or built-in)
PROVIDER_STYLE = "llmitm.provider_style"  # "openai" | "anthropic": wire format and error shape
ENDPOINT = "llmitm.endpoint"  # "chat_completions" | "responses" | "messages" | "models" | "other"
BYPASS = "llmitm.bypass"  # bool: X-Llmitm-Bypass was set (request or WebSocket upgrade)
# Turn header values are kept off metadata (it is recorded): see identify.turn_headers_of().
SESSION_VERIFIED = "llmitm.session_verified"  # bool: the session token was presented
TURN_MERGE = "llmitm.turn_merge"  # "override" | "merge" | None
INJECTED = "llmitm.injected"  # list[dict]: {"name", "origin"} per injected header, no values
REPAIRS = "llmitm.repairs"  # dict[str, int]: repair class -> count
PAYMENT = "llmitm.payment"  # dict: the payment decision/outcome for this request
LEAKS = "llmitm.leaks"  # list[dict]: guard findings
STREAM_TIMING = "llmitm.stream_timing"  # list[[seconds_since_headers, nbytes]] per client chunk
UPSTREAM_ORIGINAL = "llmitm.upstream_original"  # bool: the recording keeps the upstream body too
ANSWERED_BY_GATEWAY = "llmitm.answered_by_gateway"  # bool: the gateway made the response itself
