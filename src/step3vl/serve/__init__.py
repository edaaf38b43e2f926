"""Serving: the OpenAI-compatible HTTP API (``step3vl serve``) and the vLLM checkpoint export.

- :mod:`step3vl.serve.app` — FastAPI app: ``/v1/chat/completions``, ``/v1/models``, ``/health``,
  guarded by an API key and size/concurrency limits (:class:`~step3vl.serve.config.ServeConfig`).
- :mod:`step3vl.serve.batcher` — one worker thread, one model: drains a bounded queue and batches
  compatible requests from different clients into one ``engine.generate`` call.
- :mod:`step3vl.serve.export` — ``export_hf``: a checkpoint in the Hugging Face layout vLLM's
  built-in ``StepVLForConditionalGeneration`` (``step_vl.py``) loads (the cluster serving path).
- :mod:`step3vl.serve.bench` — throughput and latency at 1 and 16 concurrent clients.
"""
