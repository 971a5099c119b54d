"""Rollout engines: one ``generate`` contract (:mod:`.sampler`), two engines.

``rollout=native`` is :func:`.native.generate`, our own sampler: the plain batched loop (:mod:`.decoder` on the KV
cache of :mod:`.kv_cache`, drawing with :mod:`.next_token`) and, for plain Llama stacks, the shared-prefix
continuous batcher (:mod:`.continuous`). ``rollout=vllm`` is :class:`.vllm_engine.VLLMSampler`, vLLM in-process.
"""
