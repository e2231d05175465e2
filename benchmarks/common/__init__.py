"""What every benchmark shares: the command-line conventions (:mod:`.cli`),
Markdown tables (:mod:`.report`), provenance (:mod:`.provenance`), timing and
memory measurement (:mod:`.timing`, :mod:`.memory`)."""
