"""Requests to generations, below both the HTTP layer and the job queue.

* :mod:`~edgelm_agent.generation.openai_schema`: OpenAI-style bodies parsed and checked;
* :mod:`~edgelm_agent.generation.openai_format`: OpenAI-style responses and stream chunks;
* :mod:`~edgelm_agent.generation.prepare`: body → model, tokens, sampling, formatter.
* :mod:`~edgelm_agent.generation.structured_output`: ``response_format`` and ``grammar`` to
  an output constraint, built by :mod:`~edgelm_agent.generation.json_schema_grammar` and
  :mod:`~edgelm_agent.generation.gbnf`;
* :mod:`~edgelm_agent.generation.tool_calls`: tools, their grammar, and calls read back.
"""
