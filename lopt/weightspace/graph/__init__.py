"""Networks as data: the weight-space neural graph (:class:`NeuralGraphData`),
built from a module by tracing (:func:`~lopt.weightspace.graph.convert.to_graph`),
and datasets of such graphs."""
