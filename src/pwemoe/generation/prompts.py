"""Prompts as token ids: a text, or chat messages (checked) through the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages [{"role", "content"}] as the chat template takes them; every malformed one named at once."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    bad = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            bad.append(f"messages[{i}] is a {type(m).__name__}, not an object")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            bad.append(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # the OpenAI content-part form: text parts only
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not parts or any(not isinstance(p, str) for p in parts):
                bad.append(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            else:
                m = {**m, "content": "".join(parts)}
                content = m["content"]
        if not isinstance(content, str):
            bad.append(f"messages[{i}].content must be a string, got {type(content).__name__}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            bad.append(f"messages[{i}] has unsupported fields {extra} (tool calls are not supported)")
    if bad:
        raise ValueError("; ".join(bad))
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else ""} for m in messages]


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt: a text as the tokenizer encodes it (with its special tokens), or chat messages
    through the tokenizer's chat template with the assistant's turn opened (`add_generation_prompt`)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty; give some text")
        return list(tokenizer(prompt)["input_ids"])
    messages = check_messages(prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt (/v1/completions) instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = ["ROLES", "check_messages", "prompt_ids"]
