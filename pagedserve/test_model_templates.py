"""Chat templates and special tokens of the test checkpoints, written after the documented
behaviour of two model families' templates (not copied from them):

- ``qwen`` (the default; what the hermes tool parser and qwen3 reasoning parser read): ChatML
  turns. With tools, a system turn lists each tool's JSON inside ``<tools></tools>`` and says how to
  call them; an assistant's tool_calls render as ``<tool_call>{"name", "arguments"}</tool_call>``
  blocks; consecutive tool messages share one user turn, each in ``<tool_response>`` tags.
  ``enable_thinking`` (a chat_template_kwargs variable) true opens a ``<think>`` block in the
  generation prompt, false closes an empty one (as Qwen3's template does); unset, nothing. A
  conversation without tools renders exactly as plain ChatML.
- ``llama3`` (Llama 3.1; what the llama3_json tool parser reads): header tokens, a system turn
  with the knowledge cut-off, the tools (JSON, indented) and the call instruction at the start of
  the first user message; an assistant's tool calls as ``{"name", "parameters"}`` JSON (several
  joined by ``; `` where Llama's own template refuses more than one); tool results in ``ipython``
  turns.
"""

from __future__ import annotations

CHAT_FORMATS = ("qwen", "llama3")
SPECIAL_TOKENS = {
    "qwen": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama3": ("<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<|eom_id|>", "<|python_tag|>"),
}
# Tokens that end an assistant turn, besides <|endoftext|>.
END_OF_TURN = {"qwen": ("<|im_end|>",), "llama3": ("<|eot_id|>", "<|eom_id|>")}

# The text of a message's content: a string, or the text parts of a list.
_TEXT = (
    "{%- macro text(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content %}{%- for part in content %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endmacro %}"
)
_ARGS = "{%- set args = call.function.arguments %}{{- args if args is string else args | tojson }}"

QWEN = _TEXT + (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- text(messages[0]['content']) + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou can call these functions; their signatures are inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call functions, write one JSON object per call, with the name and the arguments, '"
    " 'each inside <tool_call></tool_call> tags:\\n<tool_call>\\n{\"name\": <function-name>, '"
    " '\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + text(message['content']) + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}" + _ARGS +
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is true %}{{- '<think>\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

_TURN = "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
LLAMA3 = _TEXT + (
    "{{- '<|begin_of_text|>' }}"
    "{%- set rest = messages %}{%- set system = '' %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = text(messages[0]['content']) %}{%- set rest = messages[1:] %}{%- endif %}"
    "{%- set role = 'system' %}" + _TURN +
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
    "{%- set ns = namespace(listed=false) %}"
    "{%- for message in rest %}"
    "{%- set role = 'ipython' if message['role'] in ('tool', 'ipython') else message['role'] %}" + _TURN +
    "{%- if tools and role == 'user' and not ns.listed %}{%- set ns.listed = true %}"
    "{{- 'Answer with a JSON function call that fits the request, chosen from these functions.\\n\\n'"
    " 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its '"
    " 'value}. Do not use variables.\\n\\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson(indent=4)) + '\\n\\n' }}{%- endfor %}"
    "{%- endif %}"
    "{%- if message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    "{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}" + _ARGS + "{{- '}' }}"
    "{%- endfor %}"
    "{%- elif message['content'] is mapping %}{{- message['content'] | tojson }}"
    "{%- else %}{{- text(message['content']) }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{%- set role = 'assistant' %}" + _TURN + "{%- endif %}"
)

TEMPLATES = {"qwen": QWEN, "llama3": LLAMA3}
