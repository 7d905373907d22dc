"""Requests to generations, below both the HTTP layer and the job queue.

* :mod:`~edgelm_agent.generation.openai_schema`: OpenAI-style bodies parsed and checked;
* :mod:`~edgelm_agent.generation.openai_format`: OpenAI-style responses and stream chunks;
* :mod:`~edgelm_agent.generation.prepare`: body → model, tokens, sampling, formatter.
"""
