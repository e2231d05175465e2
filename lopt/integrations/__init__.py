"""Integrations with other libraries, each imported only when asked for:
:mod:`lopt.integrations.higher` (a differentiable ``NGOptimizer`` for
``higher.innerloop_ctx``; importing it registers it) and
:mod:`lopt.integrations.dtensor` (DTensor / FSDP2 parameters)."""
