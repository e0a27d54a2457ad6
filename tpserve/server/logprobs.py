"""Log-probabilities in OpenAI's two shapes: completions (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``) and chat (``content: [{token, logprob, bytes, top_logprobs}]``), from the engine's vLLM-shaped
entries ({token_id: (logprob, rank)}, the chosen token first).

A token's text is its own decoding (a token that holds part of a UTF-8 character decodes to U+FFFD, as in
vLLM); without a tokenizer it is ``token_id:N``, vLLM's spelling. JSON has no -inf: a log-probability below
-9999 is sent as -9999.0, as vLLM does."""

from __future__ import annotations

from tpserve.proxy.outputs import Logprobs
from tpserve.proxy.tokenizer import Tokenizer
from tpserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

FLOOR = -9999.0


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def _top(entry: Logprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of an entry, most likely first."""
    return [(t, lp) for t, (lp, rank) in sorted(entry.items(), key=lambda x: x[1][1]) if rank <= k][:k]


def completion_logprobs(tokenizer: Tokenizer | None, token_ids: list[int], entries: list[Logprobs | None], k: int,
                        offset: int = 0, into: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Appends the tokens to ``into`` (a new object by default); offsets count from ``offset``."""
    out = into if into is not None else CompletionLogprobs()
    for token, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:  # a prompt's first token: nothing to condition on
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_value(entry[token][0]))
        top = {token_text(tokenizer, t): _value(lp) for t, lp in _top(entry, k)}
        top.setdefault(text, _value(entry[token][0]))  # the chosen token too, as vLLM sends it
        out.top_logprobs.append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer | None, token_ids: list[int], entries: list[Logprobs], k: int) -> ChatLogprobs:
    content = []
    for token, entry in zip(token_ids, entries, strict=True):
        text = token_text(tokenizer, token)
        top = []
        for t, lp in _top(entry, k):
            t_text = token_text(tokenizer, t)
            top.append(TopLogprob(token=t_text, logprob=_value(lp), bytes=list(t_text.encode("utf-8"))))
        content.append(ChatTokenLogprob(token=text, logprob=_value(entry[token][0]), bytes=list(text.encode("utf-8")),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)
