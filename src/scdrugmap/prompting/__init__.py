"""The prompting room: zero- and few-shot drug-response prediction by a chat model over an OpenAI-compatible API.

`fit_predict_prompt` is the benchmark's ``prompt`` strategy; `PromptConfig` its
settings; `ChatClient` the cached, rate-limited HTTP client; `prompts` the
paper's prompt (templates under ``templates/``), the gene ranking and the answer
parser. This room imports only `scdrugmap.data`.
"""

from scdrugmap.prompting.client import ChatClient, ChatResult, PromptRequestError, request_key
from scdrugmap.prompting.prompts import load_templates, parse_answer
from scdrugmap.prompting.strategy import NO_LOGPROBS_REASON, PromptConfig, describe_config, fit_predict_prompt

__all__ = [
    "NO_LOGPROBS_REASON",
    "ChatClient",
    "ChatResult",
    "PromptConfig",
    "PromptRequestError",
    "describe_config",
    "fit_predict_prompt",
    "load_templates",
    "parse_answer",
    "request_key",
]
