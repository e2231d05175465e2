"""Integrations with other libraries, each imported only when asked for:
:mod:`lopt.integrations.higher`, a differentiable ``NGOptimizer`` for
``higher.innerloop_ctx`` (importing it registers it with ``higher``).

Sharded parameters (DTensor, FSDP2) need no integration: the optimizer
handles them itself (:mod:`lopt.optim.dtensor`)."""
