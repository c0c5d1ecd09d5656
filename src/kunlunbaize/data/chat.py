"""The chat format of KunlunBaize tokenizers: the role tokens and the Jinja chat template that renders a
conversation with them (:mod:`kunlunbaize.posttrain.chat` adds both to a model).

A conversation renders as::

    <|system|>\\nYou are …<|end|>\\n<|user|>\\nWhat is 2 + 3?<|end|>\\n<|assistant|>\\n5<|end|>\\n

Each turn is a role token, a newline, the content and ``<|end|>``. The assistant's content and its ``<|end|>`` are
wrapped in ``{% generation %}…{% endgeneration %}``, so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
marks exactly the tokens the model must learn to write (TRL's ``assistant_only_loss``), ``<|end|>`` included: it
is the token that ends a reply. With ``add_generation_prompt`` the rendering ends in ``<|assistant|>\\n``, so a
prompt's rendering is a prefix of the rendering of prompt + reply.
"""

from __future__ import annotations

from typing import Any

from .tokenizer import CHAT_TOKENS

SYSTEM, USER, ASSISTANT, END = CHAT_TOKENS
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': KunlunBaize chats have system, user and assistant "
    "turns') }}"
    "{%- endif -%}"
    "{%- if message['content'] is not string -%}"
    "{{ raise_exception('the content of a ' ~ message['role'] ~ ' turn must be text') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] ~ '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|' ~ message['role'] ~ '|>\n' ~ message['content'] ~ '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
"""transformers' ``tokenizer.chat_template`` for KunlunBaize (saved with a model as ``chat_template.jinja``)."""


def missing_chat_tokens(tokenizer: Any) -> list[str]:
    """The role tokens (:data:`CHAT_TOKENS`) that ``tokenizer`` (a transformers tokenizer) does not have."""
    vocab = tokenizer.get_vocab()
    return [t for t in CHAT_TOKENS if t not in vocab]
