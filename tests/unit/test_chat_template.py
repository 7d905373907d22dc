"""ChatTemplate: the model's Jinja template, sandboxed, with clear errors."""

from __future__ import annotations

import pytest

from edgelm_agent.errors import InvalidRequest, ModelError
from edgelm_agent.inference.chat_template import ChatMessage, ChatTemplate

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TestChatTemplate:
    def test_renders_chatml_with_generation_prompt(self):
        """A ChatML template renders the conversation and the assistant prompt."""
        t = ChatTemplate(CHATML, bos_token="<s>", eos_token="</s>")
        assert t.render([ChatMessage("user", "hi")]) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )

    def test_bos_and_eos_are_available(self):
        """Templates can use bos_token and eos_token."""
        t = ChatTemplate(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            bos_token="<s>",
            eos_token="</s>",
        )
        assert t.render([ChatMessage("user", "x")]) == "<s>x</s>"

    def test_raise_exception_is_a_client_error(self):
        """A template that rejects the roles gives InvalidRequest, not a crash."""
        t = ChatTemplate(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}",
            bos_token="",
            eos_token="",
        )
        with pytest.raises(InvalidRequest, match="user first"):
            t.render([ChatMessage("assistant", "x")])

    def test_broken_template_is_a_model_error(self):
        """A template that does not compile is the model's fault: ModelError."""
        with pytest.raises(ModelError, match="does not compile"):
            ChatTemplate("{% for %}", bos_token="", eos_token="")

    def test_loop_controls_and_plain_tojson(self):
        """{% break %} compiles, and tojson writes plain JSON as transformers does."""
        t = ChatTemplate(
            "{% for m in messages %}{{ m.content | tojson }}{% break %}{% endfor %}",
            bos_token="",
            eos_token="",
        )
        assert t.render([ChatMessage("user", "<b>é"), ChatMessage("user", "x")]) == '"<b>é"'

    def test_template_type_errors_are_model_errors(self):
        """A template that fails at run time with a Python error is the model's fault."""
        t = ChatTemplate("{{ messages[0].content + 1 }}", bos_token="", eos_token="")
        with pytest.raises(ModelError, match="chat template failed"):
            t.render([ChatMessage("user", "x")])

    def test_sandbox_blocks_attribute_escapes(self):
        """A malicious template cannot reach Python internals."""
        t = ChatTemplate(
            "{{ messages.__class__.__mro__[1].__subclasses__() }}", bos_token="", eos_token=""
        )
        with pytest.raises(ModelError):
            t.render([ChatMessage("user", "x")])
